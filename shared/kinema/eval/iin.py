"""Metrics of the invertible interpretation networks (`kinema.train.iin`), judged on decoded images.

- likelihood: test negative log-likelihood (nats per dimension) and the invertibility error;
- factor probes: a linear classifier per factor on each z block (the diagonal should be high,
  the off-diagonal near chance: disentangled), against the same probe on the raw representation;
- edits: swap z_F between two test renders (IIN's factor transfer) or set it to a value's
  prototype, decode with the autoencoder and read colour, shape and position with the attribute
  probe: the target changed as asked, the other attributes stayed;
- invariance samples: what the probe's representation keeps fixed (colour, shape) and what
  varies when z is resampled (position, area);
- net2net: attribute accuracy of text -> latent samples, decoded and read by the probe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from kinema.data.scene import COLOUR_NAMES, SHAPES


def linear_probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, steps: int = 200
) -> float:
    """Test accuracy of multinomial logistic regression (L-BFGS, a little L2) on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xt, xs = (x_train - mean) / std, (x_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    lin = torch.nn.Linear(xt.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xs).argmax(-1) == y_test).float().mean())


@torch.no_grad()
def encode_all(model, latents: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, k), logdet (N,)) in chunks."""
    zs, lds = [], []
    for i in range(0, len(latents), 1024):
        z, ld, _ = model.encode(latents[i : i + 1024], None if cond is None else cond[i : i + 1024])
        zs.append(z)
        lds.append(ld)
    return torch.cat(zs), torch.cat(lds)


@torch.no_grad()
def decode_images(autoencoder, latents: torch.Tensor, batch: int = 64) -> np.ndarray:
    from kinema.train.autoencoder import to_uint8

    return np.concatenate([to_uint8(autoencoder.decode(latents[i : i + batch])) for i in range(0, len(latents), batch)])


def read_images(probe, images: np.ndarray, edges: torch.Tensor) -> dict[str, np.ndarray]:
    """The probe's reading of each image's largest object: colour, shape, position bin (-1: nothing found), u, area."""
    out = {k: np.full(len(images), -1) for k in ("colour", "shape", "position")}
    out |= {"u": np.full(len(images), np.nan), "area": np.zeros(len(images))}
    for i, res in enumerate(probe.detect(list(images))):
        if not len(res):
            continue
        o = max(res.objects, key=lambda o: o.area)
        out["colour"][i] = COLOUR_NAMES.index(o.colour)
        out["shape"][i] = SHAPES.index(o.shape)
        out["position"][i] = int(torch.bucketize(torch.tensor(o.u), edges))
        out["u"][i], out["area"][i] = o.u, o.area
    return out


def _rate(mask: np.ndarray) -> float:
    return round(float(np.mean(mask)), 4) if len(mask) else float("nan")


def _kept_breakdown(read: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict:
    """Which of the other attributes an edit kept, one rate each, and how often the probe found no object."""
    return {
        "kept": {f: _rate(read[f] == y) for f, y in truth.items()},
        "no_object": _rate(read["colour"] < 0),
    }


@torch.no_grad()
def edit_metrics(model, autoencoder, probe, test, edges: torch.Tensor, n: int, seed: int) -> dict:
    """Swap and set edits of colour, shape and position, judged by the probe on decoded images."""
    from kinema.train.iin import factor_labels

    labels = {k: v.numpy() for k, v in factor_labels(test, edges).items()}
    rng = np.random.default_rng(seed)
    judged = ("colour", "shape", "position")
    out: dict = {}
    idx = rng.choice(len(test), size=min(n, len(test)), replace=False)
    recon = read_images(probe, decode_images(autoencoder, model.edit(test.latents[idx], {})), edges)
    truth = read_images(probe, decode_images(autoencoder, test.latents[idx]), edges)
    out["identity"] = {f: _rate(recon[f] == labels[f][idx]) for f in judged}
    out["autoencoder_reconstruction"] = {f: _rate(truth[f] == labels[f][idx]) for f in judged}
    for name in judged:
        a = rng.integers(0, len(test), size=4 * n)
        b = rng.integers(0, len(test), size=4 * n)
        keep = labels[name][a] != labels[name][b]
        a, b = a[keep][:n], b[keep][:n]
        read = read_images(probe, decode_images(autoencoder, model.swap(test.latents[a], test.latents[b], name)), edges)
        others = [f for f in judged if f != name]
        target = read[name] == labels[name][b]
        stayed = np.all([read[f] == labels[f][a] for f in others], axis=0)
        out[f"swap_{name}"] = {
            "n": len(a),
            "target_changed": _rate(target),
            "others_kept": _rate(stayed),
            "both": _rate(target & stayed),
            **_kept_breakdown(read, {f: labels[f][a] for f in others}),
        }
        values, _ = model.prototypes(name)
        a = rng.choice(len(test), size=n, replace=True)
        new = (labels[name][a] + rng.integers(1, len(values), size=n)) % len(values)
        edited = torch.cat(
            [model.edit(test.latents[a[m]], {name: values[v]}) for v in range(len(values)) if (m := new == v).any()]
        )
        order = np.concatenate([np.nonzero(new == v)[0] for v in range(len(values)) if (new == v).any()])
        read = read_images(probe, decode_images(autoencoder, edited), edges)
        target = read[name] == new[order]
        stayed = np.all([read[f] == labels[f][a[order]] for f in others], axis=0)
        out[f"set_{name}"] = {
            "n": n,
            "target_changed": _rate(target),
            "others_kept": _rate(stayed),
            "both": _rate(target & stayed),
            **_kept_breakdown(read, {f: labels[f][a[order]] for f in others}),
        }
    return out


@torch.no_grad()
def factor_metrics(model, train, test, edges: torch.Tensor) -> dict:
    """Linear-probe accuracy of every factor from every z block (rows: block, columns: factor)."""
    from kinema.train.iin import factor_labels

    z_train, _ = encode_all(model, train.latents)
    z_test, _ = encode_all(model, test.latents)
    x_train, _ = model.basis.project(train.latents)
    x_test, _ = model.basis.project(test.latents)
    y_train, y_test = factor_labels(train, edges), factor_labels(test, edges)
    layout = model.layout
    blocks = {"residual": slice(0, layout.residual)} if layout.residual else {}
    blocks |= {name: layout.slice(name) for name in layout.names}
    blocks["all_z"] = slice(0, z_train.shape[1])
    table = {
        block: {
            f: round(linear_probe_accuracy(z_train[:, sl], y_train[f], z_test[:, sl], y_test[f]), 4) for f in y_train
        }
        for block, sl in blocks.items()
    }
    table["representation_x"] = {
        f: round(linear_probe_accuracy(x_train, y_train[f], x_test, y_test[f]), 4) for f in y_train
    }
    chance = {f: round(float(torch.bincount(y_test[f]).max() / len(y_test[f])), 4) for f in y_test}
    return {"linear_probe": table, "majority_class": chance}


@torch.no_grad()
def likelihood_metrics(model, test, cond: torch.Tensor | None) -> dict:
    from kinema.nn.iin import standard_normal_nll

    z, logdet = encode_all(model, test.latents, cond)
    back = torch.cat(
        [
            model.decode(
                z[i : i + 1024],
                model.basis.project(test.latents[i : i + 1024])[1],
                None if cond is None else cond[i : i + 1024],
            )
            for i in range(0, len(z), 1024)
        ]
    )
    # Against a standard normal over the same whitened coordinates (the flow as the identity).
    x, _ = model.basis.project(test.latents)
    base = standard_normal_nll(x, torch.zeros(len(x)))
    return {
        "test_nll_nats_per_dim": round(float(standard_normal_nll(z, logdet).mean()), 4),
        "gaussian_baseline_nll": round(float(base.mean()), 4),
        "invertibility_max_abs_error": float((back - test.latents).abs().max()),
        "z_std": round(float(z.std()), 4),
    }


@torch.no_grad()
def conditional_metrics(
    model, kind: str, autoencoder, probe, test, cond: torch.Tensor, edges, n: int, seed: int
) -> dict:
    """net2net: probe accuracy of samples against the caption; invariance: what stays and what varies."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(min(n, len(test)))
    labels = {"colour": test.colour[idx].numpy(), "shape": test.shape[idx].numpy()}
    out: dict = {}
    if kind == "net2net":
        for temp in (1.0, 0.7):
            read = read_images(probe, decode_images(autoencoder, model.sample(cond[idx], temp, gen)), edges)
            c, s = read["colour"] == labels["colour"], read["shape"] == labels["shape"]
            out[f"temperature_{temp}"] = {
                "n": len(idx),
                "colour": _rate(c),
                "shape": _rate(s),
                "colour_and_shape": _rate(c & s),
                "no_object": _rate(read["colour"] < 0),
            }
        return out
    per = 4  # samples per condition: does colour/shape stay while position and size vary?
    m = max(1, n // per)
    rep = idx[:m].repeat_interleave(per)
    read = read_images(probe, decode_images(autoencoder, model.sample(cond[rep], 1.0, gen)), edges)
    kept = (read["colour"] == labels["colour"][rep.numpy()]) & (read["shape"] == labels["shape"][rep.numpy()])
    u = read["u"].reshape(m, per)
    area = read["area"].reshape(m, per)
    out = {
        "n_conditions": m,
        "samples_per_condition": per,
        "colour_and_shape_kept": _rate(kept),
        "u_std_within_condition": round(float(np.nanmean(np.nanstd(u, 1))), 4),
        "u_std_of_data": round(float(test.u.std()), 4),
        "area_cv_within_condition": round(float(np.nanmean(area.std(1) / np.maximum(area.mean(1), 1e-6))), 4),
    }
    truth = read_images(probe, test.images[idx[:m]].numpy(), edges)
    out["area_cv_of_data"] = round(float(truth["area"].std() / max(truth["area"].mean(), 1e-6)), 4)
    return out


def evaluate(
    model, kind: str, train, test, edges: torch.Tensor, models_dir: Path, n: int = 200, seed: int = 0,
    representation: str = "vae", cache: Path | None = None,
) -> dict:  # fmt: skip
    """Every metric that applies to `kind`, as a JSON-able dict; edits and samples decoded by `representation`;
    the test conditions are cached in `cache` (default the trainer's)."""
    from kinema.eval.probe import Probe
    from kinema.train.iin import CACHE, conditions, load_representation

    cond = conditions(kind, test, cache or CACHE)
    out = {"likelihood": likelihood_metrics(model, test, cond)}
    if kind in ("mle", "factor"):
        out["factors"] = factor_metrics(model, train, test, edges)
    if n <= 0:
        return out
    autoencoder = load_representation(representation, models_dir)
    probe = Probe.from_file()
    if kind == "factor":
        out["edits"] = edit_metrics(model, autoencoder, probe, test, edges, n, seed)
    if kind in ("invariance", "net2net"):
        out["samples"] = conditional_metrics(model, kind, autoencoder, probe, test, cond, edges, n, seed)
    if math.isnan(out["likelihood"]["test_nll_nats_per_dim"]):
        raise FloatingPointError("the flow's test likelihood is NaN")
    return out


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def report(results: list[dict]) -> str:
    """A markdown summary of the trainer's `--results` files (one per run)."""
    lines = [
        "# IIN, invariances and net2net over autoencoder codes",
        "",
        "Tables written by `python -m kinema.eval.iin --report` from each run's `--results` JSON.",
        "",
    ]
    lines += [
        "| run | kind | representation | steps | train s | test NLL (nats/dim) | Gaussian NLL | max inversion error "
        "| factor dims |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lk = r["metrics"]["likelihood"]
        p = r["params"]
        dims = dict(zip(p["factor_names"], p["factor_dims"], strict=True)) if p["factor_names"] else "—"
        representation = r["config"].get("representation", "vae")  # runs before the option: the LDM latent
        lines.append(
            f"| {r['name']} | {r['config']['kind']} | {representation} | {r['steps_done']} | {r['train_seconds']} | "
            f"{lk['test_nll_nats_per_dim']} | {lk['gaussian_baseline_nll']} | "
            f"{lk['invertibility_max_abs_error']:.1e} | {dims} |"
        )
    for r in results:
        m = r["metrics"]
        lines += ["", f"## {r['name']}", "", "```", r["command"], "```", ""]
        if "dimension_estimate" in r:
            est = r["dimension_estimate"]
            k = r["params"]["components"]
            lines += [
                f"Dimension estimate (IIN sec. 3.3, on the {k} whitened principal components, residual score = {k}): "
                + ", ".join(f"{f} s={v:.2f} -> {est['dims'][f]}" for f, v in est["scores"].items()),
                "",
            ]
        if "factors" in m:
            table = m["factors"]["linear_probe"]
            facs = list(m["factors"]["majority_class"])
            lines += [
                "Linear-probe test accuracy of each factor (columns) from each z block (rows):",
                "",
                "| block | " + " | ".join(facs) + " |",
                "| --- |" + " --- |" * len(facs),
            ]
            for block, row in table.items():
                lines.append(f"| {block} | " + " | ".join(_pct(row[f]) for f in facs) + " |")
            lines.append(
                "| majority class | " + " | ".join(_pct(m["factors"]["majority_class"][f]) for f in facs) + " |"
            )
        if "edits" in m:
            e = m["edits"]
            lines += [
                "",
                "Edits decoded by the autoencoder and read by the attribute probe "
                f"(identity: {e['identity']}, plain autoencoder: {e['autoencoder_reconstruction']}):",
                "",
                "| edit | n | target changed | others kept | both |",
                "| --- | --- | --- | --- | --- |",
            ]
            for k, v in e.items():
                if k.startswith(("swap_", "set_")):
                    lines.append(
                        f"| {k} | {v['n']} | {_pct(v['target_changed'])} | {_pct(v['others_kept'])} | "
                        f"{_pct(v['both'])} |"
                    )
        if "samples" in m:
            lines += ["", "Samples (decoded, read by the probe):", "", "```", json.dumps(m["samples"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kinema.eval.iin", description="IIN results table")
    ap.add_argument("--report", type=Path, nargs="+", required=True, help="results JSON files of kinema.train.iin")
    ap.add_argument("--out", type=Path, default=Path("bench/results/iin"), help="writes OUT.json and OUT.md")
    ap.add_argument("--notes", type=Path, default=None, help="markdown to put under the title (findings)")
    args = ap.parse_args(argv)
    results = [json.loads(p.read_text()) | {"name": p.stem} for p in args.report]
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    text = report(results)
    if args.notes:
        head, rest = text.split("\n\n", 1)
        text = f"{head}\n\n{args.notes.read_text().strip()}\n\n{rest}"
    args.out.with_suffix(".md").write_text(text)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
