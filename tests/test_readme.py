"""The README's worked example (a new objective plugged in through the CLI) runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shards import write_singleview_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfsup3d.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str, section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.mark.parametrize("which", [0, 1], ids=["alone", "beside-triplane-in-a-multi-task-run"])
def test_plug_in_example_runs_from_the_cli(tmp_path, monkeypatch, which):
    (code,) = _blocks("python", "Plugging in a new objective")
    configs = _blocks("yaml", "Plugging in a new objective")
    assert len(configs) == 2
    (tmp_path / "my_objectives.py").write_text(code)
    cfg = yaml.safe_load(configs[which])
    urls = write_singleview_shards(tmp_path / "shards", num_samples=8, size=32, with_depth=True)
    cfg["data"]["init_args"].update(train_urls=urls, num_workers=0, batch_size=4, image_size=32)
    cfg["model"]["init_args"]["encoder"]["init_args"].update(img_size=32, depth=2, embed_dim=32, num_heads=2)
    cfg["model"]["init_args"]["encoder"]["init_args"]["num_out_layers"] = 2
    cfg["trainer"].update(max_steps=2, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False)
    path = tmp_path / "my_objective.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objectives", raising=False)
    main(["fit", "--config", str(path)])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    if which == 1:
        assert any(k.startswith("objectives.centre.head.") for k in state)
        assert any(k.startswith("objectives.triplane.triplane.") for k in state)
        assert not any(".encoder." in k for k in state if k.startswith("objectives."))


def test_plug_in_example_learns_visibly(tmp_path, monkeypatch):
    """The worked example's loss falls well below guessing one colour for the whole batch within 60 steps."""
    (code,) = _blocks("python", "Plugging in a new objective")
    (tmp_path / "my_objectives.py").write_text(code)
    cfg = yaml.safe_load(_blocks("yaml", "Plugging in a new objective")[0])
    urls = write_singleview_shards(tmp_path / "shards", num_samples=32, size=32, num_shards=2)
    cfg["data"]["init_args"].update(train_urls=urls, num_workers=0, batch_size=16)
    cfg["trainer"].update(max_steps=60, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False)
    path = tmp_path / "my_objective.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objectives", raising=False)
    main(["fit", "--config", str(path)])
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")[-3:]]
    guess = [e.value for e in events.Scalars("train/mse_of_the_batch_mean")[-3:]]
    assert sum(loss) < 0.6 * sum(guess), (loss, guess)


# ---------------------------------------------------------------- the README's claims and commands, checked
ROOT = README.parent


def _bash_lines() -> list[str]:
    """Every command line of the README's bash blocks (comments and blank lines dropped, continuations joined)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_python_version_matches_the_package_and_the_makefile():
    import tomllib

    (readme,) = set(re.findall(r"Python ≥ (3\.\d+)", README.read_text()))
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == f">={readme}"
    assert f"python3 (>= {readme})" in (ROOT / "Makefile").read_text()


def test_readme_links_configs_and_logdirs_exist():
    text = README.read_text()
    links = re.findall(r"\]\(((?:docs|configs|bench)/[^)#]+)\)", text)
    assert links and all((ROOT / link).exists() for link in links), [x for x in links if not (ROOT / x).exists()]
    configs = set(re.findall(r"configs/(?:demo/)?\w+\.yaml", text))
    assert configs and all((ROOT / c).is_file() for c in configs), configs
    roots = {yaml.safe_load((ROOT / c).read_text())["trainer"].get("default_root_dir") for c in configs}
    for logdir in re.findall(r"tensorboard --logdir (\S+?)[`)]", text):
        assert any(r and (r == logdir or r.startswith(logdir.rstrip("/") + "/")) for r in roots), (logdir, roots)


def test_readme_timm_line_is_the_one_the_plain_timm_test_runs():
    from test_cli import README_TIMM

    assert README_TIMM in "\n".join(line.removeprefix("  ") for line in README.read_text().splitlines()) + "\n"


def test_readme_demo_output_is_what_validation_prints():
    text = README.read_text()
    block = text[text.index("<!-- demo-output -->") : text.index("<!-- /demo-output -->")]
    header = re.search(r"```\n(.*?)\n", block).group(1)
    assert header in (ROOT / "callbacks" / "masked_view.py").read_text()


def test_readme_gpu_and_network_needs_are_said_where_the_paper_configs_are_run():
    text = README.read_text()
    section = text[text.index("## Using it") :]
    first = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    assert "GPU" in first and "weights" in first
    for cfg in ("masked_view", "triplane", "consensus", "multitask"):
        assert "pretrained: true" in (ROOT / "configs" / f"{cfg}.yaml").read_text()


def test_readme_commands_parse(capsys):
    """Every `selfsup3d ...` verb the README runs exists, and every config it fits parses completely."""
    verbs = {"fit", "validate", "test", "predict", "data", "export", "probe", "retrieve"}
    commands = [line for line in _bash_lines() if line.split()[0] in ("selfsup3d", "lightning")]
    assert commands
    for line in commands:
        assert line.split()[1] in verbs, line
    configs = sorted({m for line in commands for m in re.findall(r"fit --config (configs/\S+\.yaml)", line)})
    assert len(configs) >= 4
    for cfg in configs:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(ROOT / cfg), "--print_config"])
        assert exit_.value.code == 0, (cfg, capsys.readouterr().err[-2000:])
