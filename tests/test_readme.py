"""README.md: every ```python block runs, in order and in one namespace, against a tiny saved RxT folder.

The README's examples load the quickstart's output, `runs/quickstart/model`; here a tiny untrained model and an RxT
tokenizer are saved to a temporary folder and that path is substituted, so the test checks the code, not the
quickstart's training. The test command the README gives is the one CI runs (`.ci/run`), byte for byte.
"""

import re

import pytest
import torch

from conftest import REPO_ROOT
from modeling_rxt import RxTConfig, RxTForCausalLM
from modeling_rxt.tokenization_rxt import train_rxt_tokenizer
from serving import SQLiteStore, create_app, load_rxt_backend
from serving_support import ThreadServer

README = REPO_ROOT / "README.md"
QUICKSTART_MODEL = "runs/quickstart/model"
TEST_COMMAND = "bash scripts/setup_env.sh && python -m pytest -q tests"
SERVER_URL = "http://127.0.0.1:8000"  # where the docs' client examples expect `python -m serving`


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny RxT folder as the training scripts save it: model (trust_remote_code files) + tokenizer."""
    texts = [f"my cat is called brindle {i} and what is my cat called number {i * 7}" for i in range(200)]
    tokenizer = train_rxt_tokenizer(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.tiny(vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("quickstart") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_readme_python_blocks_run(model_dir, tmp_path, monkeypatch):
    blocks = code_blocks(README.read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 2, "README.md should show the chat example and the generate() example"
    assert QUICKSTART_MODEL in blocks[0], f"the first example should load {QUICKSTART_MODEL!r}"
    monkeypatch.chdir(tmp_path)  # files the examples write (the saved STM) land here
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(blocks):
        code = block.replace(QUICKSTART_MODEL, str(model_dir))
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    # what the examples promise: a saved conversation, and a session restored from it with the same STM
    assert (tmp_path / "conversation.safetensors").is_file()
    restored = namespace["chat"].stm
    assert restored.shape[0] == namespace["model"].config.stm_shape[0]
    assert torch.isfinite(restored).all()


def test_readme_test_command_is_the_ci_command():
    bash = code_blocks(README.read_text(encoding="utf-8"), "bash")
    assert TEST_COMMAND in [block.strip() for block in bash], "README.md must show the test command as one block"
    assert (REPO_ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == TEST_COMMAND
    assert "bash scripts/quickstart.sh" in [block.strip() for block in bash]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_in_readme_and_docs_resolve():
    """Every relative link of README.md and docs/ names a file of the repo and, with `#anchor`, a heading in it."""
    pages = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)  # code is not links
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", file.read_text(encoding="utf-8"),
                                                          flags=re.S | re.M), flags=re.M)  # fmt: skip
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(REPO_ROOT)}: {target} (no heading for #{anchor})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md")))
def test_docs_python_blocks_run(page, model_dir, tmp_path, monkeypatch):
    """The guides' ```python blocks run too; a folder they load (`runs/...`) is the tiny saved model."""
    blocks = code_blocks((REPO_ROOT / "docs" / page).read_text(encoding="utf-8"), "python")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    server = None
    if any(SERVER_URL in block for block in blocks):  # client examples talk to a live server on the tiny folder
        server = ThreadServer(create_app(load_rxt_backend(str(model_dir)), SQLiteStore(str(tmp_path / "state.db")),
                                         api_keys=["KEY"]))  # fmt: skip
    try:
        for index, block in enumerate(blocks):
            code = re.sub(r'"runs/[\w/]+"', repr(str(model_dir)), block)
            if server is not None:
                code = code.replace(SERVER_URL, server.url)
            exec(compile(code, f"docs/{page} python block {index + 1}", "exec"), namespace)
    finally:
        if server is not None:
            server.stop()
