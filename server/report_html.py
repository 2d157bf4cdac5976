"""The explanation of one decision as a self-contained HTML page for people, not systems.

Inline CSS and SVG only (no scripts, fonts or images to fetch), so the file can be
mailed, archived or printed to PDF as it is. Input: the explanation's JSON mapping
(``Explanation.to_json()``) with the ``performance`` series added.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from server.report_charts import contribution_chart, fmt, performance_chart

CSS = """
body{font:16px/1.55 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2933;
background:#fff;margin:0}
main{max-width:860px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 8px;border-bottom:1px solid #d9dee4;
padding-bottom:4px}
.sub{color:#6b7785;margin:0 0 18px;font-size:14px}
.summary{background:#f3f6f9;border-left:5px solid #2563a8;padding:14px 18px;font-size:18px}
.ok{background:#eef8f0;border-left:5px solid #2f8a4c;padding:10px 16px}
.bad{background:#fdf0ec;border-left:5px solid #c2571a;padding:10px 16px}
ol.reasons li{margin:4px 0;font-size:17px}
table{border-collapse:collapse;width:100%;font-size:14px;margin:8px 0}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e6e9ed;vertical-align:top}
th{color:#52606d;font-weight:600}.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12.5px;word-break:break-all;color:#3e4c59}
.note{color:#52606d;font-size:14px}
details summary{cursor:pointer;color:#2563a8}
svg{max-width:100%;height:auto}
@media print{main{padding:0}h2{break-after:avoid}svg,table{break-inside:avoid}}
"""


def render_explanation_html(report: dict[str, Any], *, expand_details: bool = False) -> str:
    """The whole page for one explanation mapping (``to_json()`` plus ``performance``).

    Args:
        report: ``Explanation.to_json()`` with a ``performance`` series added.
        expand_details: open the spec and platform tables (for print and PDF, where
            nobody can click them open).
    """
    d = report["decision"]
    sections = [
        _header(d),
        _verification(report),
        _reasons(report),
        _counterfactual(report),
        _inputs(report),
        _provenance(report, expand_details),
        _performance(report),
        _afterwards(report),
        _attestation(report),
        _glossary(),
    ]
    title = f"Why model {d['model']} decided {d['decision']:g} — prediction {d['prediction_id']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )


def _header(d: dict[str, Any]) -> str:
    when = _when(d["time"])
    if d["head"] == "binary":
        outcome = (
            f"The model gave this case a score of <b>{d['score']:.3f}</b>. Decisions are 1 when the score is at "
            f"least {d['threshold']:g}, so the decision was <b>{d['decision']:g}</b>."
        )
    elif d["head"] == "multiclass":
        outcome = (
            f"The model found class <b>{d['decision']:g}</b> the most probable (probability "
            f"<b>{d['score']:.3f}</b>), so that was the decision."
        )
    else:
        outcome = f"The model predicted <b>{fmt(d['score'])}</b>."
    return (
        f"<h1>Why this decision was made</h1>\n"
        f'<p class="sub">Prediction <code>{escape(d["prediction_id"])}</code></p>\n'
        f'<p class="summary">On {when}, version {d["model_version"]} of the model '
        f"<b>“{escape(d['model'])}”</b> made a decision about this case. {outcome}</p>"
    )


def _verification(r: dict[str, Any]) -> str:
    d, lineage = r["decision"], r["provenance"]["lineage"]
    same = "identical to" if d["score_delta"] == 0 else f"within {d['score_delta']:.1g} of"
    return (
        '<h2>How we know this is the model that decided</h2>\n<p class="ok">'
        f"We rebuilt version {d['model_version']} of the model from the recorded history alone, by replaying its "
        f"{lineage['updates']} learning steps on {lineage['labeled_examples']} labeled examples, and scored the same "
        f"inputs again: <b>{d['recomputed_score']:.6f}</b>, {same} the score recorded at the time "
        f"({d['score']:.6f}). The rebuilt model's fingerprint matches the one recorded with the decision.</p>\n"
        f'<p class="note">Tolerance: {escape(d["tolerance_text"])}</p>'
    )


def _reasons(r: dict[str, Any]) -> str:
    reasons = r["reasons"]
    items = "".join(f"<li>{escape(s)}</li>" for s in reasons["top_reasons"]) or "<li>No input moved the result.</li>"
    exact = reasons["steps"] is None
    how = (
        "For this kind of model the contributions are exact"
        if exact
        else f"This model is not linear, so the contributions were computed with integrated gradients "
        f"({reasons['steps']} steps; they add up to within {reasons['completeness_gap']:.1g})"
    )
    return (
        "<h2>The main reasons</h2>\n"
        f'<ol class="reasons">{items}</ol>\n'
        "<p>Each bar shows how much one input pushed the result up or down compared with an average case "
        f"(the {escape(reasons['output_name'])}). The average case has {fmt(reasons['baseline_output'])}; adding "
        f"every bar gives this case's {fmt(reasons['output'])}. {how}.</p>\n"
        + contribution_chart(reasons["contributions"])
    )


def _counterfactual(r: dict[str, Any]) -> str:
    cf = r["counterfactual"]
    head = "<h2>What would have changed the decision</h2>\n"
    if not cf["applicable"]:
        return head + f"<p>Not applicable: {escape(cf['note'])}.</p>"
    out = [head]
    single, minimal = cf["single_feature"], cf["minimal"]
    if single:
        c = single["changes"][0]
        out.append(
            f"<p>If <b>{escape(c['feature'])}</b> had been <b>{fmt(c['new_value'])}</b> instead of "
            f"{fmt(c['value'])} (a change of {c['change']:+.4g}, or {abs(c['change_sd']):.2f} typical spreads), "
            f"with everything else the same, the decision would have been <b>{single['new_decision']:g}</b> "
            f"(score {single['new_score']:.3f}).</p>"
        )
    if minimal:
        rows = "".join(
            f"<tr><td>{escape(c['feature'])}</td><td class='n'>{fmt(c['value'])}</td>"
            f"<td class='n'>{fmt(c['new_value'])}</td><td class='n'>{c['change']:+.4g}</td></tr>"
            for c in minimal["changes"]
        )
        out.append(
            "<p>The smallest change to all inputs together (each measured against its typical spread) that "
            f"flips the decision to <b>{minimal['new_decision']:g}</b> (score {minimal['new_score']:.3f}):</p>"
            "<table><tr><th>input</th><th class='n'>was</th><th class='n'>would be</th><th class='n'>change</th></tr>"
            f"{rows}</table>"
        )
    if not single and not minimal:
        out.append(f"<p>No change was found: {escape(cf['note'])}.</p>")
    out.append(
        f'<p class="note">Method: {escape(cf["method"])}. Every change above was checked by scoring the changed '
        "inputs with the same model version.</p>"
    )
    return "\n".join(out)


def _inputs(r: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(c['feature'])}</td><td class='n'>{fmt(c['value'])}</td>"
        f"<td class='n'>{fmt(c['baseline'])}</td><td class='n'>{c['contribution']:+.4f}</td></tr>"
        for c in r["reasons"]["contributions"]
    )
    return (
        "<h2>The inputs as the model used them</h2>\n"
        "<table><tr><th>input</th><th class='n'>value</th><th class='n'>average</th>"
        "<th class='n'>contribution</th></tr>"
        f"{rows}</table>"
    )


def _provenance(r: dict[str, Any], expand: bool) -> str:
    p, d = r["provenance"], r["decision"]
    spec, lineage, gate = p["spec"], p["lineage"], p["lineage"]["last_gate"]
    ranges = ", ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in lineage["update_ranges"]) or "none"
    rollbacks = f", after {lineage['rollbacks']} rollback(s)" if lineage["rollbacks"] else ""
    gate_text = (
        f"The last check on a learning step before this decision was at version {gate['version']}: the step was "
        f"<b>{gate['verdict']}</b> ({escape(gate['reason'])}; training loss {gate['loss_before']:.4f} → "
        f"{gate['loss_after']:.4f} on {gate['examples']} examples)."
        if gate
        else "No learning step had been taken yet: this was the initial model."
    )
    spec_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in spec.items())
    platform_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in p["platform"].items())
    opened = " open" if expand else ""
    code_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in p["code_versions"].items())
    return (
        "<h2>How the model got here</h2>\n"
        f"<p>The model “{escape(d['model'])}” was registered on {_when(p['registered_at'])} by "
        f"{escape(p['registered_by'])}: a {escape(spec['kind'])} learner on {spec['n_features']} inputs, trained "
        f"online with {escape(spec['optimizer'])} (learning rate {spec['learning_rate']:g}, "
        f"{spec['batch_size']} examples per step). Version {d['model_version']} came from "
        f"{escape(lineage['created_by'])}. Its parameters are the result of {lineage['updates']} learning steps "
        f"(versions {ranges}) on {lineage['labeled_examples']} labeled examples{rollbacks}.</p>\n"
        f"<p>{gate_text} At that version learning was {'paused' if p['paused'] else 'active'}; "
        f"{escape(p['drift'])}. Rollout stage: {escape(p['rollout_stage'])}.</p>\n"
        f'<p class="note">The exact labeled examples are committed to by <code>{lineage["examples_digest"]}</code> '
        "(SHA-256 of their ids in training order).</p>\n"
        f"<details{opened}><summary>Model specification</summary><table>{spec_rows}</table></details>\n"
        f"<details{opened}><summary>Platform and code versions</summary>"
        f"<table>{platform_rows}{code_rows}</table></details>"
    )


def _performance(r: dict[str, Any]) -> str:
    perf, version = r["performance"], r["decision"]["model_version"]
    metric = perf["metric"]
    overall = f"; {fmt(perf['overall'])} overall" if perf["overall"] is not None else ""
    what = (
        "the share of its decisions that matched the outcome reported later"
        if metric == "accuracy"
        else "the average error of its predictions against the outcome reported later"
    )
    return (
        f"<h2>How accurate the model has been</h2>\n<p>For each stretch of model versions, {what} "
        f"({perf['labeled']} labeled decisions{overall}). Every decision was made before its outcome was known, "
        "so this is the accuracy people actually experienced.</p>\n"
        + performance_chart(perf["points"], metric, version)
    )


def _afterwards(r: dict[str, Any]) -> str:
    a, d = r["afterwards"], r["decision"]
    out = ["<h2>What happened afterwards</h2>"]
    if a["label"] is None:
        out.append("<p>No outcome has been reported for this case yet.</p>")
    else:
        source = (
            "assumed by default (no outcome arrived in time)" if a["label_defaulted"] else escape(a["label_source"])
        )
        verdict = ""
        if d["head"] != "regression":
            verdict = " The decision was correct." if a["label"] == d["decision"] else " The decision was not correct."
        out.append(f"<p>The outcome was reported as <b>{a['label']:g}</b> (source: {source}).{verdict}</p>")
    learned = a["learned"]
    if learned["applied_in_version"] is not None:
        still = "" if learned["still_in_head_lineage"] else ", but that step was later undone by a rollback"
        out.append(f"<p>The model learned from this case in version {learned['applied_in_version']}{still}.</p>")
    elif a["label"] is not None:
        late = " (it arrived too late to be used)" if a["label_in_window"] is False else " (yet)"
        out.append(f"<p>The model has not learned from this case{late}.</p>")
    for rb in a["rolled_back"]:
        out.append(
            f'<p class="bad">Version {d["model_version"]} was later abandoned: at version {rb["version"]} the model '
            f"was rolled back to version {rb['to_version']} by {escape(rb['actor'])} "
            f"({escape(rb['reason'])}, {_when(rb['time'])}).</p>"
        )
    if not a["rolled_back"]:
        out.append(
            f"<p>No rollback has undone version {d['model_version']}. The model is now at version "
            f"{a['head_version']}.</p>"
        )
    return "\n".join(out)


def _attestation(r: dict[str, Any]) -> str:
    t, d = r["attestation"], r["decision"]
    position = f" The decision itself is at position {d['log_position']}." if d["log_position"] else ""
    return (
        "<h2>What this report rests on</h2>\n"
        f"<p>This report was computed from the event log up to position <b>{t['log_position']}</b>.{position} "
        f"{escape(t['replay'])}.</p>\n"
        f"<table><tr><th>parameters fingerprint (recorded)</th><td><code>{escape(d['params_digest'])}</code></td></tr>"
        f"<tr><th>parameters fingerprint (rebuilt)</th><td><code>{escape(d['replayed_digest'])}</code></td></tr>"
        f"<tr><th>seal</th><td>{escape(t['seal'])}: {escape(t['seal_note'])}</td></tr></table>"
    )


def _glossary() -> str:
    return (
        '<h2>Words used here</h2>\n<p class="note"><b>Score</b>: the model\'s estimated probability. '
        "<b>Log-odds</b>: the score on an unbounded scale, where contributions add up. "
        "<b>Typical spread</b>: one standard deviation of that input among the cases the model learned from. "
        "<b>Fingerprint</b>: a SHA-256 digest of every parameter; equal fingerprints mean identical models. "
        "<b>Version</b>: every recorded change to the model (a learning step, a rollback, a pause) is a new "
        "version.</p>"
    )


def _when(iso: str) -> str:
    moment = datetime.fromisoformat(iso)
    return moment.strftime("%-d %B %Y at %H:%M:%S %Z").replace("UTC+00:00", "UTC")
