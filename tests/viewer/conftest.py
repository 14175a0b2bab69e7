"""A store of real runs on a tiny model (a lens, head scores, an evaluation, a run whose file went missing)
and a viewer serving it on a free loopback port."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mechscope import records

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


@dataclass
class Runs:
    root: Path
    lens: str
    heads: str
    heads2: str
    missing: str
    missing_file: str
    missing_name: str
    lens_file: str


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> Runs:
    from mechscope.improve.harness import EvaluationResult
    from mechscope.locate.heads import HeadDetectorConfig, detect_heads
    from mechscope.locate.lens import logit_lens
    from mechscope.model.hooked import HookedModel
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("viewer") / "runs"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    hf, tok = tiny_model("gpt2", n_positions=128)
    model = HookedModel(hf, tok)
    prompts = ["The cat sat on the mat", f"A prompt with {HOSTILE}"]
    with records.run(
        f"lens {HOSTILE}",
        tags=["lens", "tiny"],
        store=root,
        model=model,
        model_source="tiny-gpt2",
        seed=0,
        config={"prompts": prompts},
        description=f"description {HOSTILE}",
    ) as run:
        lens = logit_lens(model, prompts)
        run.log_metric("final_kl", float(lens["kl"][-1].mean()))
        run.log_metric("first_kl", float(lens["kl"][0].mean()))
        EvaluationResult(
            tensors={"values": torch.tensor([[0.9, 0.1], [0.02, 0.05], [12.0, 12.5]])},
            axes={"values": ("metric", "condition")},
            labels={"metric": ["refusal", "kl_neutral", "perplexity"], "condition": ["before", "after"]},
            config={
                "target": ["refusal"],
                "side": ["kl_neutral", "perplexity"],
                "task": "refusal",
                "intervention": HOSTILE,
                "samples": [{"prompt": HOSTILE, "before": "I cannot", "after": "Sure"}],
            },
        )
        for step in range(5):
            run.log_metric("loss", 2.0 / (step + 1), step=step)
    lens_id = run.id
    with records.run("heads", tags=["heads", "tiny"], store=root, model=model, model_source="tiny-gpt2", seed=1) as run:
        scores = detect_heads(model)
        run.log_metric("final_kl", 0.5)
        run.log_metric("max_induction", float(scores["induction"].max()))
    heads_id = run.id
    with records.run("heads", tags=["heads", "tiny"], store=root, model=model, model_source="tiny-gpt2", seed=2) as run:
        scores = detect_heads(model, config=HeadDetectorConfig(seed=2))
        run.log_metric("final_kl", 0.4)
        run.log_metric("max_induction", float(scores["induction"].max()))
    heads2_id = run.id
    with records.run("lost file", tags=["broken"], store=root) as run:
        logit_lens(model, ["One two three"])
    missing_id = run.id
    with records.open_store(root) as s:
        art = s.get(missing_id).artifacts[0]
        s.artifact_path(art).unlink()
        lens_file = s.get(lens_id).artifacts[0].name
    torch.set_num_threads(before)
    return Runs(
        root=root,
        lens=lens_id,
        heads=heads_id,
        heads2=heads2_id,
        missing=missing_id,
        missing_file=art.relative_path,
        missing_name=art.name,
        lens_file=lens_file,
    )


@pytest.fixture(scope="package")
def server(store):
    from mechscope.viewer import serve_in_thread

    srv, thread = serve_in_thread(store.root, port=0)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()
    srv.viewer.close()
    thread.join(timeout=10)


def _get(url: str, timeout: float = 30.0, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace"), dict(exc.headers)


@pytest.fixture(scope="package")
def get():
    """(status, body, headers) of a request, also for error statuses."""
    return _get
