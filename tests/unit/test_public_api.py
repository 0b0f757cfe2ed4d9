"""The public API: what `import merlin_molar` promises, configs that round-trip through JSON and refuse
bad choices early, and a repository without machine-specific paths."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import merlin_molar
from merlin_molar.items import Stage1Config
from merlin_molar.models import GRU4RecConfig, MolarConfig, SASRecConfig
from merlin_molar.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_every_public_name_is_exported_and_importable():
    assert sorted(merlin_molar.__all__) == sorted(set(merlin_molar.__all__))
    for name in merlin_molar.__all__:
        assert getattr(merlin_molar, name) is not None, name
    for name in ("MolarBlock", "MolarConfig", "MolarTask", "SASRecConfig", "GRU4RecConfig", "molar_model",
                 "sasrec_model", "gru4rec_model",
                 "prepare", "read_dataset", "save_model", "load_model", "content_item_inputs"):
        assert name in merlin_molar.__all__


def test_the_package_and_the_triton_client_import_without_torch():
    """``import merlin_molar`` and the client load no deep-learning stack: public names load on first use."""
    code = ("import sys, merlin_molar, merlin_molar.serving.client\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'transformers4rec', 'nvtabular', 'merlin.core')"
            " if m in sys.modules)\n"
            "print(heavy)\n"
            "print(merlin_molar.MolarConfig.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "merlin_molar.models.molar"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'MolarBlok'"):
        merlin_molar.__getattr__("MolarBlok")


@pytest.mark.parametrize("config", [
    MolarConfig(),
    MolarConfig(id_branch="none", rec_loss="infonce", align_positions="all", max_align_rows=128,
                sasrec=SASRecConfig(d_model=32, n_heads=2), id_weight_grid=(0.0, 1.0)),
    SASRecConfig(d_model=32, n_layers=1),
    GRU4RecConfig(d_model=32, n_layers=2, dropout=0.0),
    MolarConfig(id_model="gru4rec", gru4rec=GRU4RecConfig(d_model=48, max_length=50), max_length=50),
    Stage1Config(method="full", target_modules=["q_proj"]),
    TrainConfig(epochs=3, early_stopping_patience=0),
])
def test_configs_round_trip_through_json(config):
    from dataclasses import asdict

    values = json.loads(json.dumps(asdict(config)))
    assert type(config)(**values) == config


@pytest.mark.parametrize("make, message", [
    (lambda: MolarConfig(id_branch="sideways"), r"id_branch must be one of \['frozen', 'joint', 'none'\]"),
    (lambda: MolarConfig(rec_loss="mse"), r"rec_loss must be one of \['bce', 'ce', 'infonce'\]"),
    (lambda: MolarConfig(align_positions="first"), r"align_positions must be one of \['all', 'last'\]"),
    (lambda: MolarConfig(llm=3), "llm must be a config dict"),
    (lambda: MolarConfig(id_model="bert4rec"), r"id_model must be one of \['gru4rec', 'sasrec'\]"),
    (lambda: MolarConfig(id_weight_grid=(0.5, 2.0)), r"must lie in \[0, 1\]"),
    (lambda: SASRecConfig(max_length=1), "max_length must be at least 2"),
    (lambda: SASRecConfig(d_model=30, n_heads=4), "divisible by n_heads"),
    (lambda: Stage1Config(method="qlora"), r"method must be one of \['full', 'lora'\]"),
])
def test_bad_choices_fail_at_construction_and_list_the_allowed_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configs_have_no_shared_mutable_defaults():
    a, b = MolarConfig(), MolarConfig()
    assert a.llm is not b.llm and a.sasrec is not b.sasrec and a.gru4rec is not b.gru4rec


def test_no_absolute_machine_paths_in_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.cfg", "*.toml", "Makefile", "*.sh"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"""["'(=\s](/work|/home/\w+|/root|/tmp/molar\w*|/Users/\w+)/""")
    hits = [f"{f}: {line.strip()}" for f in files for line in (REPO / f).read_text().splitlines()
            if pattern.search(line) and "noqa: machine-path" not in line]
    assert hits == []
