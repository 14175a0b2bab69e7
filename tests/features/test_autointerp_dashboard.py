"""Automated descriptions (baseline explainer, an OpenAI-compatible endpoint on loopback, a local model),
detection and causal scoring, and the dashboard page in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from store_cases import TEXTS

from mechscope.features import SAEConfig, SparseAutoencoder, feature_cards
from mechscope.features.autointerp import (
    ChatExplainer,
    ExplainerError,
    Explanation,
    KeywordJudge,
    OpenAIChat,
    TransformersChat,
    annotate_cards,
    auroc,
    causal_score,
    describe_features,
    feature_examples,
)
from mechscope.features.dashboard import dashboard_html, write_dashboard
from mechscope.features.store import token_rows
from mechscope.model.hooked import HookedModel
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
SITE = "blocks.1.hook_resid_post"
BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser")
BROWSER = next((b for b in BROWSERS if shutil.which(b)), None)


@pytest.fixture(scope="module")
def model():
    return HookedModel(*tiny_model("llama"))


@pytest.fixture(scope="module")
def planted(model):
    """An SAE whose feature 0 writes the unembedding direction of one token (so clamping it up makes
    that token likelier) and fires on the token ' cat'; the other features are random."""
    d = model.dims.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=8, activation="relu", site=SITE), seed=0)
    target = int(model.tokenizer(" mat", add_special_tokens=False)["input_ids"][0])
    with torch.no_grad():
        w_u = model.weights.W_U.float()
        sae.W_dec[0] = w_u[:, target] / w_u[:, target].norm()
    return sae, model.tokenizer.decode([target])


def test_causal_scoring_ranks_a_feature_with_a_planted_effect_above_random_ones(model, planted):
    sae, word = planted
    rows = token_rows(model, TEXTS, 16)[:8]
    real = causal_score(model, sae, 0, [word], rows, value=8.0)
    controls = [causal_score(model, sae, f, [word], rows, value=8.0) for f in range(1, 8)]
    # measured: 2.93 nats for the planted feature; random features -0.90 .. 0.34 (first token unclamped)
    assert real > 1.0 and real > 2 * max(controls), (real, controls)


def test_the_baseline_describes_detects_and_scores_features(model):
    d = model.dims.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=16, activation="topk", k=2, site=SITE), seed=1)
    rows = token_rows(model, TEXTS, 16)
    records = describe_features(model, sae, rows, [0, 3, 7])
    assert [r["feature"] for r in records] == [0, 3, 7]
    for r in records:
        assert r["description"] and 0.0 <= r["detection"] <= 1.0
    cards = annotate_cards(feature_cards(model, sae, TEXTS, [0, 3, 7], seq_len=16), records)
    assert cards[0].description == records[0]["description"] and "detection" in cards[0].scores
    assert auroc([1, 1], [0, 0]) == 1.0 and auroc([0.5], [0.5]) == 0.5


def test_keyword_detection_separates_a_token_feature(model):
    """A feature that fires exactly on ' cat' is described by the baseline as such, and detection is perfect."""
    rows = token_rows(model, TEXTS, 16)
    cat = int(model.tokenizer(" cat", add_special_tokens=False)["input_ids"][0])
    examples = feature_examples(model, _token_feature(model, cat), rows, [0])[0]
    from mechscope.features.autointerp import TokenStatsExplainer, detection_score

    explanation = TokenStatsExplainer().explain(examples)
    assert explanation.keywords[0] == model.tokenizer.decode([cat]).strip().lower(), explanation
    assert detection_score(explanation, examples.held_out, examples.negatives, KeywordJudge()) == 1.0


def test_the_baseline_names_a_feature_that_fires_on_newlines() -> None:
    """A whitespace-only token is a token like any other: named, judged and predicted, not dropped."""
    from mechscope.features.autointerp import FeatureExamples, TokenStatsExplainer, detection_score
    from mechscope.features.autointerp.examples import Context

    top = [Context(["x", " =", " 1", "\n"], [0, 0, 0, 5.0], next_token="    ") for _ in range(6)]
    other = [Context(["a", " b", " c", " d"], [0.0] * 4, next_token=" e") for _ in range(6)]
    examples = FeatureExamples(0, explain=top, held_out=top, negatives=other)
    explanation = TokenStatsExplainer().explain(examples)
    assert explanation.keywords == ["\n"] and explanation.predicted == ["    "], explanation
    assert "'\\n' (100% of top activations)" in explanation.text, explanation.text
    assert detection_score(explanation, examples.held_out, examples.negatives, KeywordJudge()) == 1.0
    assert KeywordJudge()(explanation, Context(["\n", " a"], [0.0, 0.0])) == 0.5


def _token_feature(model: HookedModel, token: int) -> SparseAutoencoder:
    """An SAE at the embedding-adjacent site whose feature 0 fires on one token (read off hook_embed)."""
    d = model.dims.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2, activation="jumprelu", site="hook_embed"), seed=0)
    emb = model.weights.W_E.float()
    with torch.no_grad():
        direction = emb[token] / emb[token].norm()
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = direction
        sae.b_dec.zero_()
        scores = emb @ direction
        others = torch.cat([scores[:token], scores[token + 1 :]])
        sae.threshold[0] = (float(scores[token]) + float(others.max())) / 2
        sae.threshold[1] = 1e9
    return sae


class _Stub(BaseHTTPRequestHandler):
    delay = 0.0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.delay)
        prompt = body["messages"][0]["content"]
        content = "the word 'cat' in short sentences\nNext: sat, ran" if "<<" in prompt else "yes"
        data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _serve(delay: float) -> HTTPServer:
    handler = type("Stub", (_Stub,), {"delay": delay})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_openai_compatible_endpoint_explains_and_failures_are_quick_clear_errors(model):
    rows = token_rows(model, TEXTS, 16)
    cat = int(model.tokenizer(" cat", add_special_tokens=False)["input_ids"][0])
    examples = feature_examples(model, _token_feature(model, cat), rows, [0])[0]
    server = _serve(0.0)
    try:
        chat = OpenAIChat(f"http://127.0.0.1:{server.server_port}/v1", timeout=5)
        explanation = ChatExplainer(chat).explain(examples)
        assert explanation == Explanation("the word 'cat' in short sentences", ["cat"], ["sat", "ran"])
    finally:
        server.shutdown()
    with pytest.raises(ExplainerError, match="unreachable or timed out"):  # nothing listens there now
        OpenAIChat(f"http://127.0.0.1:{server.server_port}/v1", timeout=2)("hi")
    slow = _serve(3.0)
    try:
        start = time.time()
        with pytest.raises(ExplainerError, match="unreachable or timed out"):
            OpenAIChat(f"http://127.0.0.1:{slow.server_port}/v1", timeout=0.5)("<<x>>")
        assert time.time() - start < 2.5
    finally:
        slow.shutdown()


def test_a_local_model_completer_runs_through_the_same_explainer(model):
    rows = token_rows(model, TEXTS, 16)
    cat = int(model.tokenizer(" cat", add_special_tokens=False)["input_ids"][0])
    examples = feature_examples(model, _token_feature(model, cat), rows, [0])[0]
    explanation = ChatExplainer(TransformersChat(model, max_new_tokens=8)).explain(examples)
    assert isinstance(explanation.text, str) and explanation.text  # a random tiny model writes noise


def _cards(model):
    d = model.dims.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=6, activation="relu", site=SITE), seed=2)
    cards = feature_cards(model, sae, TEXTS, seq_len=16, top_k=4)
    evil = replace(
        cards[1],
        description="</script><img src=x onerror=alert(1)> cats & dogs",
        scores={"detection": float("nan"), "causal": 0.5},  # NaN must not break the page's JSON
    )
    return type(cards)([cards[0], evil, *cards.cards[2:]], cards.site, cards.model)


def test_the_dashboard_page_is_self_contained_and_escapes_text(model, tmp_path):
    page = dashboard_html(_cards(model))
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "</script><img" not in page and "<\\/script><img" in page  # the JSON cannot close its element


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (apt-get install chromium-headless-shell)")
def test_the_dashboard_in_headless_chromium(model, tmp_path):
    path = write_dashboard(_cards(model), tmp_path / "dash.html")

    def chromium(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                   "--virtual-time-budget=5000", *args]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def console(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if ":CONSOLE" in line]

    done = chromium("--dump-dom", f"file://{path}#f=1")
    assert done.returncode == 0 and console(done.stderr) == [], done.stderr[-2000:]
    dom = done.stdout
    assert "Feature 1" in dom and "&lt;/script&gt;&lt;img" in dom  # the description shown as text
    assert 'class="tok top"' in dom and "background-color: rgba(255, 120, 0" in dom  # highlighted tokens
    searched = chromium("--dump-dom", f"file://{path}#q=dogs")
    assert "1 of 6 features" in searched.stdout
    assert searched.stdout.count('style="display: none;"') == 5
    shot = tmp_path / "dashboard.png"
    done = chromium("--window-size=1200,900", f"--screenshot={shot}", f"file://{path}#f=1")
    assert done.returncode == 0 and shot.stat().st_size > 10_000 and console(done.stderr) == []


def test_neuronpedia_export_carries_the_cards_fields(model, tmp_path):
    from mechscope.features.neuronpedia import export_neuronpedia

    cards = _cards(model)
    paths = export_neuronpedia(cards, tmp_path / "np", model_id="tiny-llama", sae_id="1-res", batch_size=4)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json"]
    records = [r for p in paths for r in json.loads(p.read_text())]
    assert [r["feature_index"] for r in records] == [c.feature for c in cards]
    first, card = records[0], cards[0]
    assert first["frac_nonzero"] == card.frequency and first["pos_str"] == [t for t, _ in card.promoted]
    top = first["activations"][0]
    assert top["values"][top["maxValueTokenIndex"]] == pytest.approx(top["maxValue"])
    assert sum(first["freq_hist_data_bar_heights"]) > 0
    assert records[1]["explanations"][0]["description"].startswith("</script>")
