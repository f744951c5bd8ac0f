"""Docs that run and stay true: the README's quick shell blocks and its Python run, every relative link resolves,
the README names the transformers range CI installs, and the project speaks of the project (no development-process
words in the README, the user guides or the code)."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# every document a user reads
CLEAN_DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
              ROOT / "vlmkv" / "models" / "pocket" / "MODEL_CARD.md"]
# the README's two commands and the setup they share: they are what CI itself runs (.ci/run), far over a minute; and
# the vLLM section's (its own environment, a server): CI's vLLM tests run the same server and request
LONG = ("bash scripts/demo.sh", "bash scripts/test.sh", "bash scripts/setup.sh", "bash scripts/setup-vllm.sh",
        "VLLM_CPU_KVCACHE_SPACE=2 VLLM_HOST_IP=127.0.0.1 .venv-vllm/bin/python -m vlmkv.vllm serve",
        "curl -s http://127.0.0.1:8000/v1/completions")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_quick_shell_commands_run(capsys):
    """Every README shell line other than the two commands (and the setup they run) is run here, as a user would."""
    from vlmkv.cli import main

    ran = 0
    for block in _blocks(README.read_text(), "bash"):
        for line in block.splitlines():
            for cmd in (c.strip() for c in line.split("#")[0].split("&&")):
                if not cmd or cmd.startswith(LONG) or cmd.startswith(". .venv/bin/activate"):
                    continue
                argv = shlex.split(cmd)
                assert argv[0] == "vlmkv", f"a README command this test does not know how to run: {cmd!r}"
                assert main(argv[1:]) == 0, cmd
                ran += 1
    assert ran, "the README has no quick command left to run"
    assert "KV cache" in capsys.readouterr().out


def test_readme_python_runs():
    code = _blocks(README.read_text(), "python")
    assert code, "the README lost its Python example"
    for block in code:
        exec(compile(block, "README.md", "exec"), {})


def _docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("vlmkv/**/*.md")),
            *sorted(ROOT.glob("benchmarks/**/*.md"))]


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = [ln for ln in links if not re.match(r"[a-z]+:", ln) and not ln.startswith("#")
              and not (doc.parent / ln.split("#")[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_names_the_transformers_range_ci_installs():
    ci = (ROOT / ".ci" / "run").read_text()
    oldest = re.search(r"transformers==([0-9.]+)", ci).group(1)
    import transformers

    text = README.read_text()
    assert oldest in text and transformers.__version__ in text, \
        f"the README must name the tested range: {oldest} (.ci/run) and {transformers.__version__} (this install)"


PROCESS = re.compile(r"\b[Ss]essions? \d+|\b(issue|Issue) #?\d+|(?<![{\w])#\d{1,3}\b|\bv\d+ ?(->|→) ?v\d+")


def _sources() -> list[Path]:
    return [p for p in sorted(ROOT.glob("**/*.py")) if ".venv" not in p.parts and "site-packages" not in p.parts]


def test_no_development_process_words_in_the_readme_guides_or_code():
    """No "session N", issue numbers or "vN -> vN+1" histories where a user reads: git keeps the history."""
    hits = []
    for path in CLEAN_DOCS + _sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PROCESS.search(line) and "{image#" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_results_md_is_what_the_committed_records_give():
    """docs/RESULTS.md is written by benchmarks/report.py from the records; an edit by hand, or a record changed
    without rerunning it, shows here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (ROOT / "docs" / "RESULTS.md").read_text() == report.render(figures=False), \
        "docs/RESULTS.md differs from `python benchmarks/report.py`: rerun it"
