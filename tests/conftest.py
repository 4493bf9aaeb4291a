"""Test set-up: Triton's CPU interpreter when there is no GPU, and fresh-but-replayable random seeds."""
import os
import random

import pytest
import torch
import torch.utils._device

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit, hence module level

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (DSM_FAST_TEST_SEED replays one); printed in the report when the test fails."""
    value = int(os.environ.get("DSM_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed = {value}")
    return value


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled floating tensors during the test (kernel tests use it so that
    an output element a kernel forgets to write shows up as NaN)."""
    empty, empty_like = torch.empty, torch.empty_like
    # `with torch.device(...)` redirects the factory functions it lists once, at first use (an lru_cache); listed
    # while patched, the real torch.empty would escape every later device context (a meta model built on the CPU).
    torch.utils._device._device_constructors()

    def poison(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture
def failing_compiler():
    """make(part): a torch.compile backend (Dynamo → AOTAutograd, graphs run as traced, no code generation) whose
    'forward' or 'backward' graph compiler raises, or whose compiled forward raises an OOM when it 'run's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory while running the compiled forward")

    def make(part: str):
        def compiler(graph: str):
            def compile_graph(gm, example_inputs):
                if graph == part:
                    raise RuntimeError(f"cannot lower the {part} graph\n(details)")
                return make_boxed_func(out_of_memory if part == "run" else gm.forward)
            return compile_graph

        return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))

    return make
