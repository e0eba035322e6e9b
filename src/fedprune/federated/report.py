"""Summaries of a federated run directory: a markdown report and plots."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from .. import atomic


ACCURACY_KEYS = ("acc", "acc_norm")
"""what ``eval.accuracy_examples`` logs on a multiple-choice dataset (commonsense_qa)"""


def read_jsonl(path: Path) -> list[dict]:
    """Records of a run's JSON Lines log: a torn last line (a crash mid-write) is skipped, any other
    malformed line is an error naming the file and line (:func:`fedprune.atomic.read_jsonl`)."""
    return atomic.read_jsonl(path)


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def summarise(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl is missing or empty: not a fedprune run directory")
    clients = read_jsonl(run_dir / "clients.jsonl")
    status = Counter(c["status"] for c in clients)
    per_device: dict[str, Counter] = defaultdict(Counter)
    for c in clients:
        per_device[c["device"]][c["status"]] += 1
    evald = [m for m in metrics if "test_loss" in m]
    rounds = [m for m in metrics if m["round"] > 0]
    return {
        "run_dir": str(run_dir), "rounds": len(rounds), "metrics": metrics, "clients": clients,
        "status": dict(status), "per_device": {k: dict(v) for k, v in per_device.items()},
        "base_test_loss": evald[0].get("test_loss") if evald and evald[0]["round"] == 0 else None,
        "final": evald[-1] if evald else None,
        "peak_rss_mb": max(m.get("peak_rss_mb", 0) for m in metrics),
        "server_share": (sum(m.get("server_s", 0) for m in rounds) /
                         max(sum(m.get("server_s", 0) + m.get("client_wall_s", 0) for m in rounds), 1e-9)),
    }


def markdown(s: dict) -> str:
    lines = [f"# Federated run `{s['run_dir']}`", ""]
    cfg_path = Path(s["run_dir"]) / "config.yaml"
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        f = cfg["federation"]
        lines += [f"strategy **{f['strategy']}**, {f['rounds']} rounds, {f['clients_per_round']} clients/round, "
                  f"model {cfg['model']['name']}, partition {cfg['data']['partition']} "
                  f"({cfg['data']['num_clients']} clients), fleet `{f['fleet']}`", ""]
    acc = [k for k in ACCURACY_KEYS if any(k in m for m in s["metrics"])]  # multiple-choice runs only
    lines += ["| round | test loss | ppl | Rouge-L | " + "".join(f"{k} | " for k in acc)
              + "train loss | clients ok | sim time (s) | wall (s) | MB up | MB down |",
              "|---:|---:|---:|---:|" + "---:|" * len(acc) + "---:|---:|---:|---:|---:|---:|"]
    for m in s["metrics"]:
        lines.append("| " + " | ".join([
            str(m["round"]), _fmt(m.get("test_loss")), _fmt(m.get("test_ppl")), _fmt(m.get("rouge_l")),
            *[_fmt(m.get(k)) for k in acc],
            _fmt(m.get("train_loss")), f"{m.get('clients_ok', '-')}/{m.get('clients_selected', '-')}",
            _fmt(m.get("sim_time_s"), 5), _fmt(m.get("wall_s"), 5),
            _fmt(m.get("bytes_up", 0) / 1e6, 4), _fmt(m.get("bytes_down", 0) / 1e6, 4)]) + " |")
    lines += ["", f"Client outcomes: {s['status']}. Peak resident memory {s['peak_rss_mb']:.0f} MB. "
              f"Server overhead share of per-round compute (select/configure/validate/aggregate vs client "
              f"training): {100 * s['server_share']:.2f} %.", "", "| device | " + " | ".join(
                  ["ok", "dropped", "straggler", "rejected"]) + " |", "|---|---:|---:|---:|---:|"]
    for dev, c in sorted(s["per_device"].items()):
        lines.append(f"| {dev} | " + " | ".join(str(c.get(k, 0)) for k in ("ok", "dropped", "straggler", "rejected")) + " |")
    lines += ["", "![metrics vs rounds](metrics_rounds.png) ![metrics vs simulated time](metrics_simtime.png) "
              "![participation](participation.png)", ""]
    return "\n".join(lines)


def plot(s: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evald = [m for m in s["metrics"] if "test_loss" in m]
    keys = [k for k in ("test_loss", "rouge_l", *ACCURACY_KEYS) if any(k in m for m in evald)]
    paths = []
    for xkey, name, label in (("round", "metrics_rounds.png", "round"),
                              ("sim_time_s", "metrics_simtime.png", "simulated time (s)")):
        fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 3.5), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(m.get(xkey, 0), m[k]) for m in evald if k in m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set_xlabel(label)
            ax.set_ylabel(k)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    per_client = Counter(c["cid"] for c in s["clients"] if c["status"] == "ok")
    devices = {c["cid"]: c["device"] for c in s["clients"]}
    fig, ax = plt.subplots(figsize=(8, 3))
    names = sorted(set(devices.values()))
    for i, dev in enumerate(names):
        cids = sorted(c for c, d in devices.items() if d == dev)
        ax.bar(cids, [per_client.get(c, 0) for c in cids], label=dev, color=f"C{i}")
    ax.set_xlabel("client id")
    ax.set_ylabel("rounds completed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "participation.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "participation.png")
    return paths


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    s = summarise(run_dir)
    plot(s, run_dir)
    atomic.write_text(run_dir / "report.md", markdown(s))
    return run_dir / "report.md"
