"""The emulation's library loaded with ctypes (``Emulator``), its op methods mirroring csrc/cuda/bindings.cpp.

The same input conversions, input and output layouts and launcher calls as the torch binding, with
outputs and workspaces filled with a poison byte first (so anything the kernels leave unwritten shows).
The launchers choose their grids, blocks and shared memory as on the GPU; the emulator checks those
launches as the driver does and runs every block, thread by thread. An op is prepared as a ``Call``
(tensors in the kernels' layouts) and run here (``Emulator.run``) or in a forked child
(``mutants.run_isolated``).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

POISON = 0xFF            # fills outputs, workspaces and shared memory: NaN for floats, -1 for integers
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
H100_SHARED_OPTIN = 232448   # sharedMemPerBlockOptin of an H100 / H200 (227 KiB)
H100_SMS = 132
KERNEL_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class EmulatorError(RuntimeError):
    """A launch the emulated driver rejected, a fault inside a kernel, or the binding's shared memory check."""

    def __init__(self, code: int, message: str):
        super().__init__(f"CUDA emulation error {code}: {message}")
        self.code = code


@dataclass
class Call:
    """A prepared op call: ``launch()`` runs the kernels (no torch inside, so it may run in a forked child)
    and returns the status; ``outputs`` are what the kernels write; ``finish()`` makes the op's result."""
    launch: Callable[[], int]
    outputs: list[torch.Tensor]
    finish: Callable[[], Any]
    keep: list = field(default_factory=list)  # inputs in the kernels' layouts, alive until the call is done


def poisoned(shape, dtype, byte: int = POISON, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty filled with ``byte`` (what the binding's at::empty leaves is undefined)."""
    t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    t.untyped_storage().fill_(byte)
    return t


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def conv_geometry(a, weight, z, stride, padding, dilation) -> list[int]:
    """ConvGeometry's 15 sizes, as csrc/conv_checks.h computes them (the shapes must be valid)."""
    N, K, H, W = a.shape
    O, _, kh, kw = weight.shape
    sy, sx = stride
    py, px = padding
    dy, dx = dilation
    Ho = (H + 2 * py - dy * (kh - 1) - 1) // sy + 1
    Wo = (W + 2 * px - dx * (kw - 1) - 1) // sx + 1
    assert tuple(z.shape) == (N, O, Ho, Wo), (tuple(z.shape), (N, O, Ho, Wo))
    return [N, K, H, W, O, kh, kw, Ho, Wo, sy, sx, py, px, dy, dx]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I = ctypes.c_int
_SIGNATURES = {
    "carfast_emu_configure": (None, [_I, ctypes.c_uint64, _I, _I64]),
    "carfast_emu_message": (ctypes.c_char_p, []),
    "carfast_emu_launch_count": (_I, []),
    "carfast_emu_launch_info": (None, [_I, _P, ctypes.POINTER(ctypes.c_char_p)]),
    "carfast_emu_ablated_consumer": (_I, [_P, _I64, _I, _I, _I] + [_P] * 12),
    "carfast_emu_closed_form": (_I, [_P, _I64, _I64, _I] + [_P] * 14 + [_I, _I, _I, _P, _P]),
    "carfast_emu_score_reduce": (_I, [_I64, _I64, _I64, _I, _P, _I64, _I64, _P, _P, _P, _P, _P]),
    "carfast_emu_selftest": (_I, [_I, _P, _I]),
    "carfast_emu_convert": (None, [_I, _P, _P, _I64]),
    "carfast_emu_fma": (None, [_I, _P, _P, _P, _P, _I64]),
}


class Emulator:
    """One loaded build of the emulation: an emulated H100 (132 SMs, 227 KiB of shared memory per block
    with the opt-in) whose ops take and return CPU tensors, as the CUDA ops take and return CUDA ones."""

    def __init__(self, lib_path: str, order: str = "forward", seed: int = 0, poison: int = POISON,
                 sm_count: int = H100_SMS, shared_optin: int = H100_SHARED_OPTIN):
        """order: the schedule, "forward", "reverse" or "shuffled" (with ``seed``), see
        csrc/cuda/emu/runtime.h; poison: the byte shared memory, outputs and workspaces start as;
        sm_count and shared_optin: the device the launchers plan for."""
        self.path = lib_path
        self.lib = ctypes.CDLL(lib_path)
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self.order, self.seed, self.poison = order, seed, poison
        self.sm_count, self.shared_optin = sm_count, shared_optin

    def _apply(self) -> None:
        """Sets this object's schedule and device on the library (Emulators of one build share its state)."""
        self.lib.carfast_emu_configure(ORDERS[self.order], self.seed, self.poison, self.shared_optin)

    def _launcher(self, fn, args) -> Callable[[], int]:
        def launch() -> int:
            self._apply()
            return fn(*args)
        return launch

    def message(self) -> str:
        return self.lib.carfast_emu_message().decode()

    def launches(self) -> list[dict]:
        """The launches of the last call: kernel, grid, block, dynamic shared bytes, configuration error."""
        out = []
        for i in range(self.lib.carfast_emu_launch_count()):
            v, name = _int64s([0] * 8), ctypes.c_char_p()
            self.lib.carfast_emu_launch_info(i, v, ctypes.byref(name))
            out.append(dict(kernel=name.value.decode(), grid=tuple(v[0:3]), block=tuple(v[3:6]), shared_bytes=v[6],
                            error=v[7]))
        return out

    def run(self, call: Call):
        """Runs a prepared call in this process; EmulatorError if the launch or a kernel failed."""
        code = call.launch()
        if code != 0:
            raise EmulatorError(code, self.message())
        return call.finish()

    # -- carfast::ablated_consumer (bindings.cpp, ablated_consumer_cuda) --------------------------------
    def prepare_ablated_consumer(self, a, weight, z, scale, shift, residual, act, filters, images, stride,
                                 padding, dilation, out_dtype=None) -> Call:
        geom = conv_geometry(a, weight, z, stride, padding, dilation)
        O, Ho, Wo = geom[4], geom[7], geom[8]
        P = filters.shape[0]
        res = residual is not None
        # a, z and residual are read in one dtype: a's when they share it, else float32
        a_k, z_k, r_k = a, z, residual
        if z.dtype != a.dtype or (res and residual.dtype != a.dtype):
            a_k, z_k = a.float(), z.float()
            r_k = residual.float() if res else None
        want = out_dtype or a.dtype
        out_k = KERNEL_DTYPE.get(want)
        out_t = want if out_k is not None else torch.float32
        out = poisoned((P, O, Ho, Wo), out_t, self.poison)
        if not out.is_contiguous(memory_format=torch.channels_last):
            out = poisoned((P, O, Ho, Wo), out_t, self.poison, torch.channels_last)

        def finish():
            return out if out_k is not None else out.to(want)

        if out.numel() == 0:
            return Call(lambda: 0, [out], finish)
        wt = weight.float().permute(1, 2, 3, 0).contiguous()  # [K, kh, kw, O]
        scale_f, shift_f = scale.float().contiguous(), shift.float().contiguous()
        filters_c, images_c = filters.contiguous(), images.contiguous()
        strides = [_int64s(t.stride() if t is not None else (0,) * 4) for t in (a_k, z_k, r_k)]
        args = (_int64s(geom), P, int(act), KERNEL_DTYPE[a_k.dtype], out_k if out_k is not None else 0,
                _ptr(a_k), strides[0], _ptr(wt), _ptr(z_k), strides[1], _ptr(r_k), strides[2], _ptr(scale_f),
                _ptr(shift_f), _ptr(filters_c), _ptr(images_c), _ptr(out))
        return Call(self._launcher(self.lib.carfast_emu_ablated_consumer, args), [out], finish,
                    [a_k, z_k, r_k, wt, scale_f, shift_f, filters_c, images_c, args])

    def ablated_consumer(self, *args, **kwargs) -> torch.Tensor:
        return self.run(self.prepare_ablated_consumer(*args, **kwargs))

    # -- carfast::closed_form_logits / closed_form_score (bindings.cpp, closed_form_inputs, run_closed_form)
    def prepare_closed_form(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                            padding, dilation, labels=None) -> Call:
        score = labels is not None
        geom = conv_geometry(a, weight, z, stride, padding, dilation)
        N, C, J = geom[0], logits.shape[1], filters.shape[0]
        ins = [a.contiguous(), weight.transpose(0, 1).contiguous(), z.contiguous(),
               residual.contiguous() if residual is not None else None, scale.contiguous(), shift.contiguous(),
               tail.contiguous(), logits.contiguous(), filters.contiguous(),
               labels.contiguous() if score else None]
        if score:
            outs = [poisoned((J, C), torch.int64, self.poison), poisoned((J, C), torch.float64, self.poison),
                    poisoned((J, N), torch.bool, self.poison)]
            out_ptrs = [None, *map(_ptr, outs)]
        else:
            outs = [poisoned((J, N, C), torch.float32, self.poison)]
            out_ptrs = [_ptr(outs[0]), None, None, None]
        head = (_int64s(geom), C, J, int(act), *map(_ptr, ins), *out_ptrs, int(score), self.sm_count)
        plan = _int64s([0] * 6)
        self._apply()
        code = self.lib.carfast_emu_closed_form(*head, 0, None, plan)
        if code != 0:
            raise EmulatorError(code, self.message())
        workspace = poisoned((plan[5],), torch.uint8, self.poison)
        args = (*head, 1, _ptr(workspace), None)
        self.last_plan = dict(zip(("tile_images", "tiles", "a_in_shared", "w_in_shared", "shared_bytes",
                                   "workspace_bytes"), list(plan)))
        finish = (lambda: tuple(outs)) if score else (lambda: outs[0])
        return Call(self._launcher(self.lib.carfast_emu_closed_form, args), outs, finish, [ins, workspace, args])

    def closed_form_logits(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                           padding, dilation) -> torch.Tensor:
        return self.run(self.prepare_closed_form(a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                                 stride, padding, dilation))

    def closed_form_score(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride,
                          padding, dilation):
        return self.run(self.prepare_closed_form(a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                                 stride, padding, dilation, labels=labels))

    # -- carfast::score_reduce (bindings.cpp, score_reduce_cuda) ----------------------------------------
    def prepare_score_reduce(self, logits, labels, slots, num_slots) -> Call:
        P, C = logits.shape
        outs = [poisoned((num_slots, C), torch.int64, self.poison),
                poisoned((num_slots, C), torch.float64, self.poison), poisoned((P,), torch.bool, self.poison)]
        labels_c, slots_c = labels.contiguous(), slots.contiguous()
        args = (P, C, num_slots, KERNEL_DTYPE[logits.dtype], _ptr(logits), logits.stride(0), logits.stride(1),
                _ptr(labels_c), _ptr(slots_c), *map(_ptr, outs))
        return Call(self._launcher(self.lib.carfast_emu_score_reduce, args), outs, lambda: tuple(outs),
                    [logits, labels_c, slots_c, args])

    def score_reduce(self, logits, labels, slots, num_slots):
        return self.run(self.prepare_score_reduce(logits, labels, slots, num_slots))

    # -- the emulation's own checks ------------------------------------------------------------------------
    def selftest(self, which: int, threads: int, out_size: int) -> tuple[int, torch.Tensor]:
        """Runs test kernel ``which`` of csrc/cuda/emu/selftest.cu; (status, its int64 output)."""
        out = poisoned((out_size,), torch.int64, self.poison)
        self._apply()
        return self.lib.carfast_emu_selftest(which, _ptr(out), threads), out

    def convert(self, kind: int, x: torch.Tensor) -> torch.Tensor:
        """The shim's conversions: 0 float32 -> float16, 1 float16 -> float32, 2 -> bfloat16, 3 bfloat16 -> float32."""
        out_dtype = {0: torch.float16, 1: torch.float32, 2: torch.bfloat16, 3: torch.float32}[kind]
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=out_dtype)
        self.lib.carfast_emu_convert(kind, _ptr(x), _ptr(out), x.numel())
        return out

    def fma(self, kind: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """0: fmaf, 1: __fmaf_rn, 2: __fadd_rn(__fmul_rn(a, b), c), elementwise on float32 tensors."""
        out = torch.empty_like(a)
        self.lib.carfast_emu_fma(kind, _ptr(a), _ptr(b), _ptr(c), _ptr(out), a.numel())
        return out
