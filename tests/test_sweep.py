"""Issue 12's sweep: each file of a real run, export and prepared dataset damaged in turn, each reader run on it.

The rules (which command needs which file, and what each fault must give) are data in
tests/sweep_cases.py. The default suite runs DEFAULT_CASES, a few cases per command and fault; the
full cross product (every file found by walking the trees x every fault x every command that reads
the tree) is marked slow. `python tests/sweep_report.py` runs the full sweep and prints the failures
grouped by cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sweep_cases import COMMANDS, FAULTS, LATEST, REQUIRED_KEYS, Case, Sweep, all_cases, build_trees, describe, group

DEFAULT_CASES = [
    # generate from a checkpoint: the weights, config and tokenizer are needed; the optimizer is not
    Case("generate-checkpoint", f"{LATEST}/model.safetensors", "truncate"),
    Case("generate-checkpoint", f"{LATEST}/config.json", "json-list"),
    Case("generate-checkpoint", f"{LATEST}/tokenizer.json", "random"),
    Case("generate-checkpoint", f"{LATEST}/tokenizer_config.json", "missing"),
    Case("generate-checkpoint", f"{LATEST}/training_state/optimizer.pt", "empty"),
    Case("generate-checkpoint", f"{LATEST}/training_state", "file-for-dir"),
    # generate from a run: the `latest` pointer; an older checkpoint is not read
    Case("generate-run", "latest", "empty"),
    Case("generate-run", "latest", "missing"),
    Case("generate-run", "checkpoint-000002/model.safetensors", "truncate"),
    # export
    Case("export-checkpoint", f"{LATEST}/generation_config.json", "json-string"),
    Case("export-checkpoint", f"{LATEST}/tokenizer.json", "dir-for-file"),
    # resume: the training state is needed
    Case("resume", f"{LATEST}/training_state/rng.pt", "random"),
    Case("resume", f"{LATEST}/training_state/state.json", "json-keys"),
    # the exports
    Case("generate-model", "tokenizer.json", "empty"),
    Case("generate-model", "config.json", "json-keys"),
    Case("generate-onnx", "model.onnx", "truncate"),
    Case("generate-onnx", "finetune_onnx.json", "json-list"),
    Case("generate-onnx", "tokenizer.json", "missing"),
    Case("generate-onnx", "README.md", "random"),
    # a prepared dataset
    Case("train-prepared", "tokens.bin", "truncate"),
    Case("train-prepared", "meta.json", "json-keys"),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    return Sweep(build_trees(tmp_path_factory.mktemp("sweep-trees")), tmp_path_factory.mktemp("sweep-cases"))


@pytest.mark.parametrize(
    "command", [pytest.param(name, marks=pytest.mark.slow) if name == "resume" else name for name in COMMANDS]
)
def test_commands_succeed_on_intact_trees(sweep, command):
    """The control: each command works on the undamaged tree (and its result is what damaged runs match)."""
    sweep.baseline(command)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda case: case.id)
def test_damaged_file(sweep, case):
    outcome = sweep.run(case)
    assert outcome.passed, describe(outcome)


def test_default_cases_cover_every_command_and_fault():
    """The fast subset touches every command and every fault, also after one is added."""
    assert {case.command for case in DEFAULT_CASES} == set(COMMANDS)
    assert {case.fault for case in DEFAULT_CASES} == set(FAULTS)


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_full_sweep(sweep, command, fault):
    """Every entry of the tree the command reads, found by walking it, damaged by `fault`."""
    cases = [case for case in all_cases(sweep.trees, [command]) if case.fault == fault]
    if not cases:
        pytest.skip(f"no entry of the {COMMANDS[command].tree} tree takes the {fault} fault")
    outcomes = [sweep.run(case) for case in cases]
    failing = [outcome for outcome in outcomes if not outcome.passed]
    report = "\n".join(
        f"  {cause} ({len(items)}):\n" + "\n".join(f"    {describe(o)}" for o in items)
        for cause, items in group(failing).items()
        if items
    )
    assert not failing, f"{len(failing)} of {len(outcomes)} cases fail:\n{report}"


# --- Hypothesis: any wrong JSON in the ONNX manifest (a cheap reader, so many examples are affordable) ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def wrong_json(original: dict, required: tuple[str, ...]):
    """A value that is not an object, or the original object without at least one needed key (plus noise)."""
    lacking = st.builds(
        lambda dropped, extra: {**{k: v for k, v in original.items() if k not in dropped}, **extra},
        st.sets(st.sampled_from(required), min_size=1),
        st.dictionaries(st.text(max_size=8).filter(lambda key: key not in original), json_values, max_size=3),
    )
    return json_values.filter(lambda value: not isinstance(value, dict)) | lacking


MANIFEST = "finetune_onnx.json"


@pytest.fixture(scope="module")
def manifest(sweep) -> dict:
    return json.loads((sweep.trees["export-onnx"] / MANIFEST).read_text())


# No shrinking: each example runs a command, and the drawn value is printed with a failure anyway.
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_wrong_onnx_manifest(sweep, manifest, data):
    value = data.draw(wrong_json(manifest, REQUIRED_KEYS[MANIFEST]), label="manifest")
    outcome = sweep.run(
        Case("generate-onnx", MANIFEST, "json-value"), damage=lambda path: path.write_text(json.dumps(value))
    )
    assert outcome.passed, describe(outcome)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, relative",
    [
        ("generate-checkpoint", f"{LATEST}/config.json"),
        ("resume", f"{LATEST}/training_state/state.json"),
        ("train-prepared", "meta.json"),
        ("train-prepared", "finetune_prepared.json"),
    ],
)
@settings(
    max_examples=8,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_wrong_json(sweep, command, relative, data):
    original = json.loads((sweep.trees[COMMANDS[command].tree] / relative).read_text())
    value = data.draw(wrong_json(original, REQUIRED_KEYS[Path(relative).name]), label=relative)
    outcome = sweep.run(Case(command, relative, "json-value"), damage=lambda path: path.write_text(json.dumps(value)))
    assert outcome.passed, describe(outcome)
