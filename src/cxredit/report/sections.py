"""One renderer per report section: `Context -> safe HTML` (the body below the heading)."""

from __future__ import annotations

import json
import math

from cxredit.report.html import (
    NOT_MEASURED,
    Context,
    Safe,
    _dict,
    _is_num,
    command_text,
    ctr_plot_uri,
    esc,
    figure_html,
    fmt,
    keyed_table,
    kv_table,
    note,
    per_alpha_table,
    table,
    td,
)

_RECON_ORDER = ("mse", "psnr", "ssim", "ms_ssim", "lpips", "n", "steps", "space", "init",
                "latent_noise")
_RECON_LABELS = {"mse": "MSE ↓", "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑",
                 "ms_ssim": "MS-SSIM ↑", "lpips": "LPIPS ↓", "n": "images",
                 "steps": "optimisation steps", "space": "latent space", "init": "started from",
                 "latent_noise": "initial latent noise (x std of w)"}
_RECON_COLS = {"encoder": "encoder E(x)", "projection": "optimisation (projection)"}
_SEP_ORDER = ("separation", "separation_cv", "auc", "auc_in_sample", "auc_cv",
              "balanced_accuracy", "balanced_accuracy_cv", "n_pos", "n_neg")
_SEP_LABELS = {"separation": "separation (in-sample)",
               "separation_cv": "separation (cross-validated)",
               "auc": "AUC", "auc_in_sample": "AUC (in-sample)", "auc_cv": "AUC (cross-validated)",
               "balanced_accuracy": "balanced accuracy",
               "balanced_accuracy_cv": "balanced accuracy (cross-validated)",
               "n_pos": "positives (cardiomegaly)", "n_neg": "negatives (healthy)"}


def _missing(what: str) -> str:
    return note(f"{esc(what)}: {NOT_MEASURED}")


def summary(ctx: Context) -> str:
    m = ctx.metrics
    cards: list[tuple[str, str]] = []
    data = ctx.section("data")
    if _is_num(data.get("n")):
        split = f" ({data['split']} split)" if data.get("split") else ""
        kind = "phantom images" if data.get("phantom") else "images"
        cards.append((fmt(data["n"]), f"{kind}{split}"))
    gen = ctx.section("generation")
    if _is_num(gen.get("fid")):
        cards.append((fmt(gen["fid"]), f"FID ({gen.get('extractor', 'unknown')} features)"))
    for name, rec in _dict(m.get("reconstruction")).items():
        if _is_num(_dict(rec).get("ssim")):
            cards.append((fmt(rec["ssim"]), f"{_RECON_COLS.get(name, name)} SSIM"))
    for space, sep in _dict(m.get("separability")).items():
        if _is_num(_dict(sep).get("separation_cv")):
            cards.append((fmt(sep["separation_cv"]), f"separation, cross-validated ({space})"))
            break
    edit = ctx.section("edit")
    if _is_num(edit.get("pushed_past_0_5")):
        cards.append((f"{100 * edit['pushed_past_0_5']:.0f}%",
                      "healthy images pushed past CTR 0.5"))
    if _is_num(_dict(edit.get("lec")).get("ssim")):
        cards.append((fmt(edit["lec"]["ssim"]), "latent editing consistency (SSIM)"))
    out = ['<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
        for v, k in cards) + "</div>" if cards else _missing("headline numbers")]

    targets = [t for t in m.get("targets") or [] if isinstance(t, dict)] \
        if isinstance(m.get("targets"), list) else []
    if not targets:
        out.append(_missing("targets"))
        return "".join(out)
    rows = []
    for t in targets:
        met = t.get("met")
        badge = ('<span class="badge met">met</span>' if met is True else
                 '<span class="badge missed">missed</span>' if met is False else
                 '<span class="badge">not measured</span>')
        rows.append([f"<td>{esc(t.get('name', '?'))}</td>", td(t.get("value")),
                     f"<td>{esc(t.get('target', ''))}</td>", f"<td>{badge}</td>"])
    n_met = sum(t.get("met") is True for t in targets)
    out.append(f"<h3>Targets: {n_met} of {len(targets)} met</h3>")
    out.append(table(["target", "value", "goal", "status"], rows, num_cols={1}))
    return "".join(out)


def samples(ctx: Context) -> str:
    return ('<div class="row">' + ctx.figure("samples", "generated samples")
            + ctx.figure("real", "real images") + "</div>")


def reconstructions(ctx: Context) -> str:
    out = [ctx.figure("reconstructions",
                      "columns: real image, encoder reconstruction, optimisation reconstruction")]
    rec = {k: v for k, v in ctx.section("reconstruction").items() if isinstance(v, dict)}
    out.append(keyed_table(rec, _RECON_ORDER, _RECON_LABELS, _RECON_COLS) if rec
               else _missing("reconstruction numbers"))
    return "".join(out)


def separability(ctx: Context) -> str:
    out = [ctx.figure("separability_histogram",
                      "LDA projections of healthy vs cardiomegaly latents")]
    sep = {k: v for k, v in ctx.section("separability").items() if isinstance(v, dict)}
    if not sep:
        out.append(_missing("separability numbers"))
        return "".join(out)
    out.append(keyed_table(sep, _SEP_ORDER, _SEP_LABELS))
    out.append(note("Separation: distance between the class means along the LDA axis, in "
                    "within-class standard deviations. In-sample numbers fit and score the same "
                    "latents; cross-validated numbers score held-out folds and are the ones to "
                    "trust. On phantoms, the true_ctr row applies the same measure to the "
                    "ground-truth cardiothoracic ratio, the quantity the labels come from."))
    return "".join(out)


def directions(ctx: Context) -> str:
    d = ctx.section("directions")
    names = d.get("names") if isinstance(d.get("names"), list) else []
    cos = d.get("cosine")
    out = []
    if not names and cos is None:
        return _missing("directions")
    if (isinstance(cos, list) and len(cos) == len(names)
            and all(isinstance(r, list) and len(r) == len(names) for r in cos)):
        rows = []
        for name, row in zip(names, cos):
            cells = []
            for v in row:
                shade = (f' style="background:rgba(36,86,166,{min(abs(v), 1) * 0.35:.2f})"'
                         if _is_num(v) and math.isfinite(v) else "")
                cells.append(f'<td class="num"{shade}>{fmt(v)}</td>')
            rows.append([f"<th>{esc(name)}</th>"] + cells)
        out.append("<h3>Cosine similarity between directions</h3>")
        out.append(table(["direction"] + [esc(n) for n in names], rows))
    else:
        out.append(note("directions: " + ", ".join(esc(n) for n in names)))
        out.append(_missing("cosine matrix"))
    files = _dict(d.get("files"))
    if files:
        out.append(kv_table([(f"{k} file", str(v)) for k, v in files.items()]))
    return "".join(out)


def edits(ctx: Context) -> str:
    edit = ctx.section("edit")
    alphas = edit.get("alphas")
    caption = (f"edit sweep along the {edit.get('direction', '?')} direction"
               + (f", α = {', '.join(str(a) for a in alphas)}" if isinstance(alphas, list)
                  else ""))
    out = [ctx.figure("edit_sweep", caption)]
    if not edit:
        out.append(_missing("edit numbers"))
        return "".join(out)
    out.append(kv_table([
        ("direction", edit.get("direction")), ("images edited", edit.get("n")),
        ("α values", alphas),
        ("fraction of healthy images past CTR 0.5 at some α (identity kept)",
         edit.get("pushed_past_0_5"))]))
    return "".join(out)


def ctr(ctx: Context) -> str:
    edit = ctx.section("edit")
    out = []
    rel = ctx.figures.get("ctr_vs_alpha")
    if rel and ctx.resolve(rel).is_file():
        out.append(ctx.figure("ctr_vs_alpha", "CTR vs edit strength α"))
    elif edit.get("alphas") is not None and edit.get("ctr_mean") is not None:
        if rel:
            out.append(note(f"figure file {esc(rel)} not found; drawn from the numbers"))
        try:
            out.append(figure_html(ctr_plot_uri(edit),
                                   "CTR vs edit strength α (drawn from metrics.json)"))
        except ValueError as e:
            out.append(note(f"CTR plot could not be drawn: {esc(e)}"))
    else:
        out.append(_missing("CTR vs α"))
    tab, notes = per_alpha_table(edit, [
        ("ctr_mean", "CTR mean"), ("ctr_std", "CTR std"), ("frac_past_0_5", "fraction past 0.5"),
        ("p_cardiomegaly_mean", "P(cardiomegaly), classifier")])
    out.append(tab)
    out.extend(notes)
    if edit and edit.get("p_cardiomegaly_mean") is None:
        out.append(_missing("classifier probability of cardiomegaly"))
    return "".join(out)


def identity(ctx: Context) -> str:
    edit = ctx.section("edit")
    tab, notes = per_alpha_table(edit, [
        ("ssim_outside_heart", "SSIM outside heart ↑"),
        ("mse_outside_heart", "MSE outside heart ↓"),
        ("ssim_true_counterfactual", "SSIM to true counterfactual ↑")])
    out = [tab or _missing("SSIM / MSE outside the heart"), *notes]
    if tab and edit.get("ssim_true_counterfactual") is None:
        out.append(note(f"SSIM to the true counterfactual: {NOT_MEASURED} (phantoms only)"))
    lec = _dict(edit.get("lec"))
    if lec:
        out.append("<h3>Latent editing consistency</h3>")
        out.append(kv_table([(k.upper() if k in ("mse", "ssim") else k, v)
                             for k, v in lec.items()]))
        out.append(note("LEC: edit in latent space, decode, re-encode, undo the edit, decode; "
                        "compared with the reconstruction of the original."))
    else:
        out.append(_missing("latent editing consistency (LEC)"))
    return "".join(out)


def metrics(ctx: Context) -> str:
    gen = ctx.section("generation")
    if not gen:
        return _missing("FID / KID")
    ext = gen.get("extractor")
    out = [f'<p class="extractor">Feature extractor: <strong>{esc(ext)}</strong></p>' if ext
           else '<p class="warn">Feature extractor not recorded: these numbers cannot be '
                "compared with any other.</p>"]
    kid = fmt(gen.get("kid")) + (f" ± {fmt(gen['kid_std'])}" if gen.get("kid_std") is not None
                                  else "")
    rows = [("FID ↓", fmt(gen.get("fid"))), ("KID ↓", kid if gen.get("kid") is not None else "—"),
            ("baseline FID: real vs real (two halves)", fmt(gen.get("baseline_fid"))),
            ("real images", fmt(gen.get("n_real"))), ("generated images", fmt(gen.get("n_fake")))]
    known = {"extractor", "fid", "kid", "kid_std", "baseline_fid", "n_real", "n_fake"}
    rows += [(k, fmt(v)) for k, v in gen.items() if k not in known]
    out.append(table(["metric", "value"], [[f"<th>{esc(k)}</th>", f'<td class="num">{v}</td>']
                                           for k, v in rows]))
    out.append('<p class="warn">FID and KID depend on the feature extractor: numbers computed '
               "with different extractors (e.g. Inception vs a chest X-ray classifier) are not "
               "comparable. Compare with the real-vs-real baseline of the same extractor.</p>")
    return "".join(out)


def provenance(ctx: Context) -> str:
    m = ctx.metrics
    out = ["<h3>Run</h3>", kv_table([
        ("command", command_text(m)),
        ("created", m.get("created")), ("cxredit version", m.get("cxredit_version")),
        ("metrics format", f"{m.get('format')} v{m.get('format_version')}")])]
    data = ctx.section("data")
    out.append("<h3>Data</h3>")
    out.append(kv_table(list(data.items())) if data else _missing("data"))
    models = _dict(m.get("models"))
    out.append("<h3>Models</h3>")
    if not models:
        out.append(_missing("model provenance"))
    for name, info in models.items():
        out.append(f"<h4>{esc(name)}</h4>")
        if not isinstance(info, dict):
            out.append(f"<p>{fmt(info)}</p>")
            continue
        items: list[tuple[str, object]] = [("path", info.get("path"))]
        if info.get("sha256") is not None:
            items.append(("sha256", Safe(f"<code>{esc(info['sha256'])}</code>")))
        items += [(k, v) for k, v in info.items()
                  if k not in ("path", "sha256", "config") and not isinstance(v, (dict, list))]
        out.append(kv_table(items))
        if info.get("config") is not None:
            cfg = json.dumps(info["config"], indent=2, sort_keys=True, default=str)
            out.append(f"<details><summary>{esc(name)} config</summary>"
                       f"<pre>{esc(cfg)}</pre></details>")
    return "".join(out)


RENDERERS = {"summary": summary, "samples": samples, "reconstructions": reconstructions,
             "separability": separability, "directions": directions, "edits": edits, "ctr": ctr,
             "identity": identity, "metrics": metrics, "provenance": provenance}
