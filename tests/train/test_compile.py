"""``compile: true``: the compiled training step equals eager, and a compiled run saves and resumes
with the eager module's state-dict names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpcm.config import run_config
from hpcm.train import checkpoints as checkpointing
from hpcm.train import loop as train
from tests.train.test_loop import final_state
from tests.train.tiny import TINY, cli_args, sigterm_at_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's CPU notes


def test_compiled_run_equals_eager_and_resumes_with_plain_state_dict_names(tmp_path, monkeypatch):
    # Inductor's C++ code generation and compile of this graph takes minutes of CPU time on the
    # shared 2-core machine; the CPU test compiles through dynamo and AOT autograd (the same
    # captured forward and backward graphs, run by torch's eager kernels). The inductor kernels are
    # timed and checked by benchmarks/gpu_check.py's train_compile section.
    real_compile = torch.compile
    backends = []

    def compile_aot_eager(fn, **kwargs):
        backends.append("aot_eager")
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    settings = {"steps": 5, "checkpoint_every": 1, "variant": "phase1", "update_mode": "same_batch"}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(cli_args(eager, **settings)) == train.EXIT_OK

    with sigterm_at_step(3):
        assert train.main(cli_args(compiled, compile=True, **settings)) == train.EXIT_INTERRUPTED
    assert final_state(compiled)["step"] == 3
    assert train.main(cli_args(compiled, compile=True, **settings)) == train.EXIT_OK
    assert backends == ["aot_eager", "aot_eager"]  # one compiled objective per Run (start, resume)

    a, b = final_state(eager), final_state(compiled)
    assert b["step"] == 5 and b["config"]["compile"] is True
    assert list(a["model"]) == list(b["model"]), (
        "checkpoint keys differ from eager (e.g. _orig_mod.)"
    )
    best = torch.load(compiled / checkpointing.BEST_MODEL, map_location="cpu", weights_only=False)
    assert not [k for k in best if "_orig_mod" in k]
    # aot_eager runs eager's kernels. Measured once with inductor itself (phase1 same_batch, 5
    # steps, this CPU): max |compiled - eager| = 3.9e-6 with fallback_random (Run sets it), 1.3e-3
    # without (other noise)
    worst = max(
        float((a["model"][k].float() - b["model"][k].float()).abs().max())
        if a["model"][k].numel()
        else 0.0
        for k in a["model"]
    )
    assert worst <= 1e-4, worst
    assert torch.allclose(
        a["optimizer"]["balancing"]["w"], b["optimizer"]["balancing"]["w"], atol=1e-4
    )


@pytest.mark.parametrize("optimizer", ["balanced", "hierarchical_balanced"])
def test_compiled_objective_graphs_hold_only_tensors_on_the_inputs_device(optimizer):
    """Every tensor in every graph dynamo captures from the training objective lives on the
    input's device. On the GPU (docs/results-log.md GPU run 1) ``compile: true`` failed in
    inductor's C++ (CPU) code generation: the model's cached masks, built on the CPU on a cache
    miss, were traced into CPU graphs inside the CUDA step. Checked on the "meta" device, where a
    CPU tensor stands out."""
    graphs: list[list[tuple[str, str]]] = []

    def record_devices(gm, example_inputs):
        found = []
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor):
                    found.append((t.device.type, node.format_node()[:100]))
        graphs.append(found)
        return gm.forward

    cfg = run_config.resolve(
        {**TINY, "steps": 10, "device": "cpu", "optimizer": optimizer, "decomposition": "adaptive"}
    )
    run = train.Run(cfg, Path("/nonexistent-compile-check"))
    run.open_data()
    run.build(None)
    run.model.to("meta")
    if run.decomposition is not None:
        run.decomposition.to("meta")
    torch._dynamo.reset()
    objective = torch.compile(run.forward_and_loss, backend=record_devices)
    x = torch.rand(1, 3, 64, 64, device="meta")
    objective(x)
    objective(x)
    assert graphs
    elsewhere = [node for graph in graphs for device, node in graph if device != "meta"]
    assert elsewhere == []
