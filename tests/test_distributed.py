"""Data-parallel calibration: 2 CPU processes (gloo) give the 1-process result up to reduction order."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, distributed
from hfcompress.calibration.stats import LayerSums, StatsCollector, reducing
from hfcompress.testing.models import tiny_llama
from hfcompress.modules import compressed_modules
from hfcompress.streaming import compress_checkpoint

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from hfcompress import HfCompressConfig, distributed
    from hfcompress.calibration.stats import StatsCollector
    from hfcompress.streaming import compress_checkpoint

    src, out, stats_out = sys.argv[1:4]
    assert distributed.init_from_env("gloo") and distributed.world_size() == 2
    # 1. statistics of a Linear fed this rank's share of 6 batches, all-reduced
    torch.manual_seed(0)
    layer = nn.Linear(24, 8)
    xs = [torch.randn(3, 5, 24) for _ in range(6)]
    with StatsCollector({"l": layer}, {"hessian", "act_sq"}) as collector:
        for x in distributed.shard_batches(xs):
            layer(x)
    reduced = distributed.all_reduce_layer_stats(collector.stats("l"))
    # the same through the collector's reducer hook (float64 sums all-reduced before normalisation)
    with StatsCollector({"l": layer}, {"hessian", "act_sq"}, reduce=distributed.all_reduce_sums) as hooked:
        for x in distributed.shard_batches(xs):
            layer(x)
    summed = hooked.stats("l")
    if distributed.rank() == 0:
        torch.save({"hessian": reduced.hessian, "act_sq": reduced.act_sq, "n": reduced.nsamples,
                    "hook_hessian": summed.hessian, "hook_act_sq": summed.act_sq, "hook_n": summed.nsamples}, stats_out)
    # 2. streaming GPTQ on a tiny Llama, each rank on half of the calibration batches
    ids = torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    config = HfCompressConfig(method="gptq", bits=4, group_size=32)
    compress_checkpoint(src, out, config, ids, batch_size=2, show_progress=False)
    # 3. in-memory oneshot on this rank's share of ready batches
    from transformers import AutoModelForCausalLM
    import hfcompress
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    batches = [{"input_ids": w} for w in ids.split(2)]
    with distributed.reduced_statistics():
        hfcompress.oneshot(model, config, distributed.shard_batches(batches), show_progress=False)
    if distributed.rank() == 0:
        model.save_pretrained(out + "_oneshot")
    torch.distributed.destroy_process_group()
    """
)


def _ids():
    return torch.randint(1, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def test_single_process_helpers_are_identity():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard_batches([1, 2, 3]) == [1, 2, 3]
    assert distributed.init_from_env() is False  # not started by a launcher
    layer = torch.nn.Linear(4, 2)
    with StatsCollector({"l": layer}, {"hessian"}) as c:
        layer(torch.randn(3, 4))
    stats = c.stats("l")
    assert distributed.all_reduce_layer_stats(stats) is stats


def test_statistics_reducer_hook_sees_float64_sums_once():
    torch.manual_seed(0)
    seen, quiet = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    calls = []

    def double(name, sums):  # as if a second process had seen the very same inputs
        calls.append((name, sums.xtx.dtype, sums.nsamples, sums.cross))
        act_sq = None if sums.act_sq is None else sums.act_sq * 2
        return LayerSums(xtx=sums.xtx * 2, act_sq=act_sq, nsamples=sums.nsamples * 2)

    with StatsCollector({"seen": seen, "quiet": quiet}, {"hessian", "act_sq"}, reduce=double) as collector:
        seen(x)
    x2 = x.reshape(-1, 6).double()
    got = collector.stats("seen")
    assert collector.stats("seen").nsamples == got.nsamples == 20  # the reducer runs once per module
    torch.testing.assert_close(got.hessian, (2 * x2.t() @ x2 / 10).float())  # 2 (2 X^T X) / (2 n): unchanged
    torch.testing.assert_close(got.act_sq, (2 * x2.pow(2).sum(0)).float())
    # a module nobody fed: the reducer gets zero sums of the right shapes; zero samples -> identity statistics
    idle = collector.stats("quiet")
    assert torch.equal(idle.hessian, torch.eye(6)) and idle.nsamples == 0
    assert calls == [("seen", torch.float64, 10, None), ("quiet", torch.float64, 0, None)]
    calls.clear()

    # reducing(): collectors created inside use it; an explicit reduce= wins; bad reducers are named
    with reducing(double):
        with StatsCollector({"seen": seen}, {"hessian"}) as inherited:
            seen(x)
        with StatsCollector({"seen": seen}, {"hessian"}, reduce=lambda n, s: s) as explicit:
            seen(x)
    assert inherited.stats("seen").nsamples == 20 and explicit.stats("seen").nsamples == 10
    with pytest.raises(TypeError, match="reduce="):
        StatsCollector({"seen": seen}, {"hessian"}, reduce="sum")
    with StatsCollector({"seen": seen}, {"hessian"}, reduce=lambda n, s: s.xtx) as bad:
        seen(x)
    with pytest.raises(TypeError, match="must return a LayerSums"):
        bad.stats("seen")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    src = tmp_path / "dense"
    tiny_llama().save_pretrained(src, max_shard_size="100KB")
    script = tmp_path / "dp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(src), str(tmp_path / "dp_out"), str(tmp_path / "stats.pt")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # statistics: exactly those of one process over all batches, up to float64 reduction order
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 8)
    xs = [torch.randn(3, 5, 24) for _ in range(6)]
    with StatsCollector({"l": layer}, {"hessian", "act_sq"}) as collector:
        for x in xs:
            layer(x)
    full = collector.stats("l")
    got = torch.load(tmp_path / "stats.pt")
    assert got["n"] == full.nsamples == 90
    torch.testing.assert_close(got["hessian"], full.hessian, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["act_sq"], full.act_sq, rtol=1e-6, atol=1e-6)
    assert got["hook_n"] == 90
    torch.testing.assert_close(got["hook_hessian"], full.hessian, rtol=1e-12, atol=0)  # float64 sums: float32-exact
    torch.testing.assert_close(got["hook_act_sq"], full.act_sq, rtol=1e-12, atol=0)

    # the compressed model: same format, same weights
    config = HfCompressConfig(method="gptq", bits=4, group_size=32)
    one = compress_checkpoint(src, tmp_path / "one_out", config, _ids(), batch_size=2, show_progress=False)
    a, b = AutoModelForCausalLM.from_pretrained(one), AutoModelForCausalLM.from_pretrained(tmp_path / "dp_out")
    assert a.config.quantization_config.to_dict() == b.config.quantization_config.to_dict()
    ca, cb = compressed_modules(a), compressed_modules(b)
    assert sorted(ca) == sorted(cb) and len(ca) == 14
    for name in ca:
        wa, wb = ca[name].dequantize_weight(), cb[name].dequantize_weight()
        # float64 sums of partial sums vs one running sum: the float32 statistics, hence GPTQ, are identical
        assert torch.equal(wa, wb), (name, (wa != wb).float().mean().item())

    # in-memory oneshot under the launcher, on ready batches sharded by rank
    import hfcompress

    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hfcompress.oneshot(dense, config, [{"input_ids": w} for w in _ids().split(2)], show_progress=False)
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "dp_out_oneshot")
    cd, cc = compressed_modules(dense), compressed_modules(c)
    assert sorted(cd) == sorted(cc)
    for name in cd:
        assert torch.equal(cd[name].dequantize_weight(), cc[name].dequantize_weight()), name
