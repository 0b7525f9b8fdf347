"""A Kconfig choice is read as one value: cfg.MLP == "swiglu", derived by one rule (kconfig/values.py)."""

import pytest
from conftest import config_of

from kconfig.errors import ConfigError
from kconfig.tree import new_kconfig, parse_overrides
from kconfig.values import option_values, values


def test_every_choice_is_named_and_its_name_is_no_symbol():
    kconf = new_kconfig()
    assert len(kconf.unique_choices) >= 25
    for choice in kconf.unique_choices:
        node = choice.nodes[0]
        assert choice.name, f"{node.filename}:{node.linenr}: unnamed choice"
        assert not (choice.name in kconf.syms and kconf.syms[choice.name].nodes), choice.name


def test_every_option_of_every_choice_is_its_value_when_selected():
    """Select each option in turn (when its choice can apply) and read the choice as that option's value."""
    kconf = new_kconfig()
    enabling = {"MOE_SCORE": "MOE=y", "MUON_IMPL": "OPT_MUON=y", "COMPILE_MODE": "COMPILE=y",
                "FP8_RECIPE": "FP8_TORCHAO=y FP8_EMULATE=y", "TE_RECIPE": "FP8_TE=y", "CURRICULUM_KEEP": "CURRICULUM=y",
                "WANDB_MODE": "TRACK_WANDB=y", "ABLATION_ORDER": 'RUN_ABLATION=y ABLATION_STEPS="rope"',
                "SENTENCEPIECE_MODEL_TYPE": "TOKENIZER_SENTENCEPIECE=y"}
    checked = 0
    for choice in kconf.unique_choices:
        for sym, value in zip(choice.syms, option_values(choice)):
            try:
                cfg = config_of(f"{enabling.get(choice.name, '')} {sym.name}=y")
            except ConfigError:
                continue  # this option needs more than its choice (e.g. a CUDA-only one); covered elsewhere
            assert cfg[choice.name] == value and cfg[sym.name] is True, (choice.name, sym.name)
            checked += 1
    assert checked >= 60


def test_known_values_and_a_choice_that_does_not_apply_is_none():
    cfg = config_of("MLP_RELU2=y OPT_LION=y MODEL_SIZE_GPT2_MEDIUM=y")
    assert (cfg.MLP, cfg.OPTIMIZER, cfg.MODEL_SIZE, cfg.NORM, cfg.LR_SCHEDULE) == (
        "relu2", "lion", "gpt2_medium", "layernorm", "cosine")
    assert cfg.MUON_IMPL is None and cfg.MOE_SCORE is None and cfg.COMPILE_MODE is None
    cfg = config_of("OPT_MUON=y")
    assert cfg.OPTIMIZER == "muon" and cfg.MUON_IMPL in ("torch", "compact")


def test_a_matrix_axis_labels_runs_with_the_value_the_run_reads():
    from plan.expand import expand

    text = "RUN_MATRIX=y MATRIX_MLP_GELU=y MATRIX_MLP_RELU2=y MATRIX_OPT_LION=y"
    specs = expand([parse_overrides(text)], config_of(text))
    assert [(s.name, s.cfg.MLP, s.cfg.OPTIMIZER) for s in specs] == [
        ("lion-gelu", "gelu", "lion"), ("lion-relu2", "relu2", "lion")]


def test_an_unnamed_choice_is_refused_where_it_is_written(tmp_path, monkeypatch):
    import kconfig.tree as tree

    (tmp_path / "Kconfig").write_text('choice\n\tprompt "x"\nconfig A_ONE\n\tbool "one"\nconfig A_TWO\n\tbool "two"\nendchoice\n')
    monkeypatch.setattr(tree, "ROOT", tmp_path)
    monkeypatch.setattr(tree, "KCONFIG", tmp_path / "Kconfig")
    with pytest.raises(ConfigError, match=r"Kconfig:1: a choice needs a name of its own"):
        values(tree.new_kconfig())


def test_every_mlp_activation_is_a_matrix_axis_value():
    from model.mlp import ACTIVATIONS

    kconf = new_kconfig()
    assert set(option_values(kconf.named_choices["MLP"])) == set(ACTIVATIONS)
    assert all(kconf.syms.get(f"MATRIX_MLP_{name.upper()}") and kconf.syms[f"MATRIX_MLP_{name.upper()}"].nodes
               for name in ACTIVATIONS)
