"""Elastic resume: a run checkpointed on N ranks resumes on M ranks with its optimizer state carried
exactly (DeepSpeed's universal checkpoint, xdyna/train/elastic.py; DDP checkpoints hold whole
tensors and load as they are) and its per-rank random streams re-derived (xdyna/train/rank_rng.py).

End to end through xdyna-train, per strategy case of resume_runs.CASES (DeepSpeed ZeRO-2 and ZeRO-3
on the CPU/gloo path, Lightning DDP over gloo), one chain of tiny runs (:class:`ElasticRuns`): the
shared never-stopped 2-rank run of the case (the session's ``runs``; ZeRO-2's with 2 loader workers
per rank) checkpoints step 1; 1 rank with 1 loader worker resumes it and trains step 2; 2 ranks
resume that and train step 3. The ZeRO-2 chain runs with ``stage.optim.elastic_lr=linear`` (its
steps train at x0.5, then x1 of the configured rate), the ZeRO-3 and DDP chains with the default
``keep``.

What "exactly" means is checked twice, with DeepSpeed's (or torch's) readers on both sides:
- the conversion (ZeRO only): every trainable parameter's fp32 master weight, Adam
  ``exp_avg``/``exp_avg_sq`` and step in the universal folder equal those in the saved rank shards
  (joined by DeepSpeed's own fragment addresses); frozen weights are in neither. A DDP resume
  converts nothing (no ``.universal`` folder appears);
- the load: the step trained after the resume is AdamW's recurrence from exactly the saved state,
  at the learning rate the elastic policy sets. From the next checkpoint's moments the step's
  gradient follows (``g = (m' - b1 m) / (1 - b1)``); ``v' = b2 v + (1 - b2) g^2`` then holds only if
  the engine started from the saved ``m`` and ``v``, and the weight update only with the saved
  weights and step count at that rate (a fresh optimizer would start from zero moments and step 0,
  a rate off by the policy's factor would move the weights by half a step or a whole one more or
  less: both far outside the tolerances below).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xdyna import provenance
from xdyna.train import checkpointing, elastic
from xdyna.train.checkpoint_callbacks import RandomStateCheckpoint, collect_rng_states
from xdyna.train.rank_rng import rank_generator, rank_seed

from .resume_runs import CASES, reads_runs
from .tiny_run import BIN, clean_env, tiny_overrides

# Only a guard against a hung run: a loaded 2-core machine can take many minutes per run.
RUN_TIMEOUT_S = 1800
OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Chain:
    """What a case's chain runs with and should print: its 2-rank start's loader workers per rank
    and the chain's ``stage.optim.elastic_lr``, with the factor that policy puts on the learning
    rate of the step after each resume relative to the rate saved in the checkpoint it resumes
    (2 -> 1 and 1 -> 2; the run started on 2 ranks)."""

    case: str
    workers_on_two: int
    elastic_lr: str
    lr_factors: tuple[float, float]


CHAINS = {chain.case: chain for chain in (
    # linear: 1 of 2 ranks trains at x0.5; back on 2 at x1 of the configured rate, twice the saved.
    Chain("zero2-2workers", 2, "linear", (0.5, 2.0)),
    Chain("zero3", 1, "keep", (1.0, 1.0)),
    Chain("ddp", 1, "keep", (1.0, 1.0)),
)}
CHAIN_PARAMS = [pytest.param(case, marks=reads_runs(case), id=case.split("-")[0]) for case in CHAINS]


def _train(root: Path, run_id: str, shards: Path, devices: int, max_steps: int, strategy: str,
           overrides: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "xdyna-train"), *tiny_overrides(shards, root, run_id, max_steps, every_n_steps=1, strategy=strategy),
         # No export and no sample videos: nothing here reads them (the shared 2-rank runs render
         # and export under every strategy), and under ZeRO-3 sampling is the slowest part of a run.
         f"trainer.devices={devices}", "checkpoint.export_at_end=false", "samples.max_samples=0", *overrides],
        cwd=root, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{run_id}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


class ElasticRuns:
    """The chain 2 ranks -> 1 rank -> 2 ranks, each run resuming from a copy of the previous run's
    last checkpoint (as a requeued job on another node count would), trained on first use. The
    2-rank start is the shared never-stopped run of ``case`` (resume_runs.CASES)."""

    def __init__(self, root: Path, shards: Path, case: str, runs):
        self.root, self.shards, self.case, self.runs = root, shards, case, runs
        self.strategy = CASES[case][0]
        self.chain = CHAINS[case]
        self._done: dict[str, tuple[Path, str]] = {}

    def _run(self, run_id: str, devices: int, max_steps: int, resume_from: Path) -> tuple[Path, str]:
        if run_id not in self._done:
            target = self.root / run_id / "checkpoints" / resume_from.name
            target.parent.mkdir(parents=True)
            # A DeepSpeed checkpoint is a directory of shards, a DDP one a single file.
            (shutil.copytree if resume_from.is_dir() else shutil.copy2)(resume_from, target)
            done = _train(self.root, run_id, self.shards, devices, max_steps, self.strategy,
                          [f"stage.optim.elastic_lr={self.chain.elastic_lr}"])
            self._done[run_id] = (self.root / run_id / "checkpoints", done.stdout + done.stderr)
        return self._done[run_id]

    def on_two(self) -> Path:
        return self.runs.straight(self.case)

    def two_to_one(self) -> tuple[Path, str]:
        return self._run("two-to-one", 1, 2, self.on_two() / checkpointing.checkpoint_name(1))

    def one_to_two(self) -> tuple[Path, str]:
        return self._run("one-to-two", 2, 3, self.two_to_one()[0] / checkpointing.checkpoint_name(2))


@pytest.fixture(scope="module")
def chains(tmp_path_factory, shards, runs):
    """Per case, its :class:`ElasticRuns`, made on first use (a worker of ``make test`` builds only
    the chains of its own xdist group's cases)."""
    assert CASES["zero2-2workers"][0] == "deepspeed_cpu_zero2" and "data.num_workers=2" in CASES["zero2-2workers"][1]
    assert CASES["zero3"][0] == "deepspeed_cpu_zero3" and CASES["ddp"][0] == "ddp"

    @functools.cache
    def chain(case: str) -> ElasticRuns:
        return ElasticRuns(tmp_path_factory.mktemp(f"elastic-{case}"), shards, case, runs)

    return chain


# ---------------------------------------------------------------- readers (DeepSpeed's own)

def saved_zero2_states(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Per trainable parameter, the flat fp32 master weight, Adam moments and step of a ZeRO-1/2
    checkpoint directory, read with DeepSpeed's ``DeepSpeedCheckpoint`` (the rank shards joined
    by their fragment addresses, in rank order); and the optimizer's param group."""
    from deepspeed.checkpoint import DeepSpeedCheckpoint
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)

    reader = DeepSpeedCheckpoint(str(checkpoint / elastic.DEEPSPEED_TAG))
    pieces: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    steps = set()
    for rank in range(reader.dp_degree):
        shard = reader.get_zero_checkpoint_state(pp_index=0, tp_index=0, dp_index=rank)[OPTIMIZER_STATE_DICT]
        base = shard[BASE_OPTIMIZER_STATE]
        (state,) = base["state"].values()  # one parameter group: every trainable weight
        (group,) = base["param_groups"]
        steps.add(float(state["step"]))
        flats = {"fp32": shard[SINGLE_PARTITION_OF_FP32_GROUPS][0], "exp_avg": state["exp_avg"],
                 "exp_avg_sq": state["exp_avg_sq"]}
        (mapping,) = shard[PARAM_SLICE_MAPPINGS]
        for name, fragment in mapping.items():
            for key, flat in flats.items():
                pieces[name][key].append(flat.narrow(0, fragment.start, fragment.numel))
    (step,) = steps
    states = {name: {key: torch.cat(parts) for key, parts in by_key.items()} | {"step": torch.tensor(step)}
              for name, by_key in pieces.items()}
    return states, group


def saved_zero3_states(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The same for a ZeRO-3 checkpoint directory: every rank holds its padded share of each
    parameter in turn (``zero_to_fp32``'s layout and its partition rule)."""
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    tag_dir = checkpoint / elastic.DEEPSPEED_TAG
    shards = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for path in sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))]
    world = len(shards)
    flats, steps = [], set()
    for shard in shards:
        (state,) = shard["optimizer_state_dict"]["state"].values()
        (group,) = shard["optimizer_state_dict"]["param_groups"]
        steps.add(float(state["step"]))
        flats.append({"fp32": shard["fp32_flat_groups"][0], "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]})
    (step,) = steps
    (shapes,) = model_states_file(checkpoint)["param_shapes"]
    states, offset = {}, 0
    for name, shape in shapes.items():
        numel = shape.numel()
        partition, _ = zero3_partitioned_param_info(numel, world)
        states[name] = {key: torch.cat([flat[key].narrow(0, offset, partition) for flat in flats])[:numel]
                        for key in OPTIMIZER_KEYS} | {"step": torch.tensor(step)}
        offset += partition
    assert all(offset == flat["fp32"].numel() for flat in flats)
    return states, group


def saved_ddp_states(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The same for a single-file DDP checkpoint: torch's AdamW state dict (``optimizer_states[0]``)
    numbers the parameters in the order ``configure_optimizers`` handed them over, the module's
    trainable parameters in module order; the checkpoint's ``state_dict`` holds exactly those
    (``on_save_checkpoint``), in the same order, in fp32 (the weights AdamW steps)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    (optimizer,) = saved["optimizer_states"]
    (group,) = optimizer["param_groups"]
    weights = saved["state_dict"]
    assert group["params"] == list(range(len(weights))) and set(optimizer["state"]) == set(group["params"]), \
        f"{checkpoint}: {len(group['params'])} optimizer parameters, {len(weights)} trainable weights"
    states = {}
    for index, (name, weight) in zip(group["params"], weights.items()):
        state = optimizer["state"][index]
        # A misnumbered pairing would show here (or in the recurrence, where shapes happen to agree).
        assert state["exp_avg"].shape == weight.shape and weight.dtype == torch.float32, name
        states[name] = {"fp32": weight.flatten(), "exp_avg": state["exp_avg"].flatten(),
                        "exp_avg_sq": state["exp_avg_sq"].flatten(), "step": state["step"]}
    return states, group


def saved_states(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Per trainable parameter of a committed checkpoint (a ZeRO directory or a DDP file): fp32
    master weight, Adam moments and step (flat); and the optimizer's param group."""
    if checkpoint.is_file():
        return saved_ddp_states(checkpoint)
    stage = checkpointing.read_metadata(checkpoint)["zero_stage"]
    return saved_zero3_states(checkpoint) if stage == 3 else saved_zero2_states(checkpoint)


def _universal_tensor(path: Path) -> torch.Tensor:
    # ZeRO-1/2 conversions store {"param": tensor, "cat_dim": ...}, ZeRO-3 ones the tensor itself.
    value = torch.load(path, map_location="cpu", weights_only=True)
    return (value["param"] if isinstance(value, dict) else value).flatten()


def universal_states(universal: Path) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """Per parameter folder of a universal checkpoint, its flattened states; and the folders that
    hold a model-state tensor only (no optimizer state). The step is per parameter (ZeRO-1/2) or
    in the common optimizer state (ZeRO-3), where DeepSpeed's loaders take it from."""
    zero = universal / elastic.DEEPSPEED_TAG / "zero"
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    common_step = common["optimizer_state_dict"]["state"][0]["step"] if "optimizer_state_dict" in common else None
    states, model_only = {}, set()
    for folder in sorted(zero.iterdir()):
        if not folder.is_dir():
            continue
        if not (folder / "exp_avg.pt").is_file():
            model_only.add(folder.name)
            continue
        entry = {key: _universal_tensor(folder / f"{key}.pt") for key in OPTIMIZER_KEYS}
        step_file = folder / "step.pt"
        entry["step"] = torch.load(step_file, map_location="cpu", weights_only=True) if step_file.is_file() else common_step
        states[folder.name] = entry
    return states, model_only


def model_states_file(checkpoint: Path) -> dict:
    (path,) = sorted((checkpoint / elastic.DEEPSPEED_TAG).glob("*mp_rank_00_model_states.pt"))[:1]
    return torch.load(path, map_location="cpu", weights_only=False)


def client_state(checkpoint: Path) -> dict:
    """Lightning's checkpoint dict (callbacks, loops, ...): a DDP file itself, in a DeepSpeed
    directory rank 0's model-states file."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.is_file() else model_states_file(checkpoint)


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- checks

def assert_conversion_exact(source: Path, universal: Path) -> None:
    saved, _ = saved_states(source)
    converted, model_only = universal_states(universal)
    assert saved and set(converted) == set(saved), sorted(set(converted) ^ set(saved))[:5]
    for name, states in saved.items():
        for key, value in states.items():
            assert torch.equal(converted[name][key], value), f"{name} {key}: converted != saved"
    # The optimizer holds trainable weights only: the folders without optimizer state are the
    # buffers of the (trainable-only) model states, no frozen weight.
    meta = model_states_file(source)
    assert meta["frozen_param_shapes"] is None
    # (ZeRO-1/2 conversions write them, ZeRO-3 ones do not.)
    assert model_only <= set(meta["buffer_names"]), sorted(model_only - set(meta["buffer_names"]))[:5]
    assert set(meta["module"]) == set(saved) | set(meta["buffer_names"])


def assert_adamw_step_from(before: Path, after: Path, lr_scale: float = 1.0) -> None:
    """The step between two checkpoints is AdamW's recurrence from exactly ``before``'s state, at
    ``lr_scale`` times the learning rate saved in ``before``'s param group (the schedule's rate for
    the next step at the base of the run that saved it; an elastic resume may rescale it)."""
    old, group = saved_states(before)
    new, _ = saved_states(after)
    assert set(new) == set(old)
    (beta1, beta2), lr, eps, decay = group["betas"], group["lr"] * lr_scale, group["eps"], group["weight_decay"]
    step = float(next(iter(new.values()))["step"])
    assert step == float(next(iter(old.values()))["step"]) + 1
    worst_v = worst_w = 0.0
    for name, o in old.items():
        n = {key: value.double() for key, value in new[name].items()}
        o = {key: value.double() for key, value in o.items()}
        grad = (n["exp_avg"] - beta1 * o["exp_avg"]) / (1 - beta1)
        v = beta2 * o["exp_avg_sq"] + (1 - beta2) * grad**2
        worst_v = max(worst_v, ((v - n["exp_avg_sq"]).abs() / (n["exp_avg_sq"].abs() + 1e-30)).max().item())
        update = (n["exp_avg"] / (1 - beta1**step)) / ((n["exp_avg_sq"] / (1 - beta2**step)).sqrt() + eps)
        w = o["fp32"] * (1 - lr * decay) - lr * update
        worst_w = max(worst_w, (w - n["fp32"]).abs().max().item())
    # float32 rounding of the engine's own arithmetic; a fresh optimizer misses by ~100 % and ~lr.
    assert worst_v <= 1e-4, f"exp_avg_sq after the resumed step does not follow from the saved moments ({worst_v})"
    assert worst_w <= 1e-6 < lr / 100, f"weights after the resumed step do not follow from the saved state ({worst_w})"


def lr_line(chain: Chain, world_size: int) -> str:
    """The line an elastic resume onto ``world_size`` ranks prints about the learning rate (the
    chains start on 2 ranks)."""
    what = ("kept at stage.optim.lr (stage.optim.elastic_lr=keep;" if chain.elastic_lr == "keep"
            else f"x{world_size / 2:g} of stage.optim.lr (stage.optim.elastic_lr={chain.elastic_lr})")
    return f"xdyna-train: the global batch is now {world_size} ranks' (the run started on 2); learning rate {what}"


def assert_elastic_resume(runs: ElasticRuns, resumed: tuple[Path, str], original: Path, old_world: int,
                          new_world: int, step: int, old_workers: int, lr_factor: float) -> Path:
    """What every resume of a chain shows, from ``old_world`` ranks (``old_workers`` loader workers
    each) onto ``new_world`` at ``step``, its checkpoint a copy of ``original``; returns the
    checkpoint of the step trained after it."""
    checkpoints, stdout = resumed
    source, final = checkpoints / checkpointing.checkpoint_name(step), checkpoints / checkpointing.checkpoint_name(step + 1)
    assert f"xdyna-train: resumed from {old_world} ranks onto {new_world} at step {step}" in stdout
    assert lr_line(runs.chain, new_world) in stdout
    # The data position went with it: every old rank's workers' states dealt onto the new ones.
    assert f"data: resumed from {old_world} ranks x {old_workers} workers onto {new_world} ranks x 1 workers" in stdout
    # The checkpoint itself is untouched (the bytes of the run that wrote it) and stays the resume
    # candidate, a conversion never one.
    assert tree_digest(source) == tree_digest(original)
    assert [entry.path.name for entry in checkpointing.list_complete_checkpoints(checkpoints)] == [source.name, final.name]
    universal = elastic.universal_path(source)
    if runs.strategy == "ddp":
        # Whole tensors on every rank: loaded as they are, nothing converted.
        assert not [p.name for p in checkpoints.iterdir() if checkpointing.UNIVERSAL_SUFFIX in p.name]
    else:  # converted once, beside the checkpoint, exactly
        assert checkpointing.is_complete(universal) and elastic.convert_to_universal(source) == universal
        assert_conversion_exact(source, universal)
    # The world size the next checkpoint was written on: in its provenance, and for a directory in
    # the COMPLETE marker that the next resume reads (elastic.saved_world_size).
    assert provenance.read(final)["world_size"] == new_world
    if final.is_dir():
        assert checkpointing.read_metadata(final)["world_size"] == new_world
    assert_adamw_step_from(source, final, lr_factor)
    return final


@pytest.mark.slow
@pytest.mark.parametrize("case", CHAIN_PARAMS)
def test_two_ranks_onto_one(chains, case):
    """The shared 2-rank run's step-1 checkpoint resumed on 1 rank (ZeRO-3 partitions every
    parameter, not one flat buffer per rank: its universal load is stage 3's own loader)."""
    runs = chains(case)
    assert_elastic_resume(runs, runs.two_to_one(), runs.on_two() / checkpointing.checkpoint_name(1), 2, 1, step=1,
                          old_workers=runs.chain.workers_on_two, lr_factor=runs.chain.lr_factors[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", CHAIN_PARAMS)
def test_one_rank_onto_two(chains, case):
    """The 1-rank run's step-2 checkpoint resumed on 2 ranks."""
    runs = chains(case)
    first, _ = runs.two_to_one()
    final = assert_elastic_resume(runs, runs.one_to_two(), first / checkpointing.checkpoint_name(2), 1, 2, step=2,
                                  old_workers=1, lr_factor=runs.chain.lr_factors[1])
    # Two elastic resumes: the RNG streams are in their second generation, and the two ranks'
    # objective streams differ.
    rng = client_state(final)["callbacks"]["RandomStateCheckpoint"]
    assert rng["generation"] == 2 and rng["start_world_size"] == 2 and len(rng["ranks"]) == 2
    assert not torch.equal(rng["ranks"][0]["objective"], rng["ranks"][1]["objective"])
    # The provenance carries the whole chain: one link per resume (xdyna.provenance).
    chain = provenance.read(final)["resume_chain"]
    assert [(link["from_world_size"], link["world_size"], link["step"]) for link in chain] == [(2, 1, 1), (1, 2, 2)]


# ---------------------------------------------------------------- fast checks (no processes)

class _ObjectiveModule:
    """The objective-stream API of XDynaTrainingModule that RandomStateCheckpoint uses."""

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.generator = rank_generator(seed, rank)

    def objective_generator(self) -> torch.Generator:
        return self.generator

    def objective_rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_objective_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def _resume_rank(saved: dict, seed: int, rank: int, world_size: int) -> tuple[RandomStateCheckpoint, _ObjectiveModule]:
    callback, module = RandomStateCheckpoint(), _ObjectiveModule(seed, rank)
    callback.load_state_dict(saved)
    trainer = SimpleNamespace(world_size=world_size, global_rank=rank, is_global_zero=rank == 0, global_step=5)
    callback.on_train_batch_start(trainer, module, None, 0)
    return callback, module


def test_elastic_resume_rederives_every_rank_stream(capsys):
    seed, old_world = 7, 3
    torch.manual_seed(seed)
    saved = {"ranks": [dict(collect_rng_states(), objective=rank_generator(seed, rank).get_state()) for rank in range(old_world)],
             "generation": 0}
    # What every old rank drew, and will draw, from its stream; and the global stream of the run start.
    old_draws = [torch.rand(64, generator=rank_generator(seed, rank)) for rank in range(old_world)]
    global_start = torch.rand(64, generator=torch.Generator().manual_seed(seed))
    draws, global_draws = [], []
    for rank in range(2):
        callback, module = _resume_rank(saved, seed, rank, world_size=2)
        assert callback.generation == 1
        draws.append(torch.rand(64, generator=module.generator))
        global_draws.append(torch.rand(64))
    assert "xdyna-train: resumed from 3 ranks onto 2 at step 5" in capsys.readouterr().out
    assert not torch.equal(draws[0], draws[1])
    for new in draws:
        for old in old_draws:
            assert not torch.isin(new, old).any(), "a new rank replays an old rank's stream"
    assert torch.equal(global_draws[0], global_draws[1]), "the global generators must stay identical across ranks"
    assert not torch.isin(global_draws[0], global_start).any()
    # A second elastic resume starts a generation of its own.
    again = {"ranks": saved["ranks"][:2], "generation": 1}
    callback, module = _resume_rank(again, seed, 0, world_size=1)
    assert callback.generation == 2 and not torch.equal(torch.rand(64, generator=module.generator), draws[0])


def test_rank_seeds_differ_across_resume_generations():
    seeds = {rank_seed(7, rank, generation=generation) for rank in range(64) for generation in range(4)}
    assert len(seeds) == 64 * 4
    # Generation 0 is the key runs used before elastic resumes existed: their draws are unchanged.
    assert rank_seed(7, 3, generation=0) == rank_seed(7, 3)
    with pytest.raises(ValueError, match="generation must be >= 0"):
        rank_seed(7, 0, generation=-1)


def test_same_world_size_restores_the_saved_streams():
    seed = 7
    streams = [rank_generator(seed, rank) for rank in range(2)]
    for stream in streams:
        torch.rand(5, generator=stream)  # mid-stream, as after some steps
    saved = {"ranks": [dict(collect_rng_states(), objective=s.get_state()) for s in streams], "generation": 1}
    for rank in range(2):
        callback, module = _resume_rank(saved, seed, rank, world_size=2)
        assert callback.generation == 1
        assert torch.equal(torch.rand(8, generator=module.generator), torch.rand(8, generator=streams[rank]))


def _fake_checkpoint(directory: Path, world_size: int) -> Path:
    path = directory / checkpointing.checkpoint_name(4)
    (path / elastic.DEEPSPEED_TAG).mkdir(parents=True)
    (path / checkpointing.COMPLETE_MARKER).write_text(f'{{"world_size": {world_size}, "zero_stage": 2}}')
    return path


def test_universal_conversion_only_on_a_world_size_change_and_errors_name_the_checkpoint(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, world_size=2)
    calls = dict(is_global_zero=True, broadcast=lambda value: value, barrier=lambda: None)
    assert elastic.ensure_universal(checkpoint, 2, **calls) is None
    # Shards that are no DeepSpeed checkpoint: one error naming the checkpoint and both world sizes;
    # no conversion folder (not even a partial one) is left, the source is untouched.
    with pytest.raises(checkpointing.CheckpointError, match=rf"cannot resume {checkpoint} \(written on 2 ranks\) on 1"):
        elastic.ensure_universal(checkpoint, 1, **calls)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]
    assert sorted(p.name for p in checkpoint.iterdir()) == [checkpointing.COMPLETE_MARKER, elastic.DEEPSPEED_TAG]


def test_removing_a_checkpoint_removes_its_universal_conversion(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, world_size=2)
    universal = elastic.universal_path(checkpoint)
    universal.mkdir()
    (universal / checkpointing.COMPLETE_MARKER).write_text("{}")
    assert [entry.path for entry in checkpointing.list_complete_checkpoints(tmp_path)] == [checkpoint]
    checkpointing.remove_checkpoint(checkpoint)
    assert list(tmp_path.iterdir()) == []
