"""Sampling settings of a trained model, side by side: post-processing only.

A VQ-VAE prior's temperature and guidance, and the spread of an `mmd` generator's latents
(`--latent-scale`), change only how the released weights are sampled, so they cost no
privacy and need no training: this script loads one saved state (from
`probe_quality.py --save`, or a run's checkpoint) and measures each setting with the
product's evaluator (`fedgen.evaluation.Evaluator`, the one `fedgen evaluate` uses).

Choosing a setting by downstream accuracy would select on the real test set; the figures
to choose by are label consistency and the Frechet distance (generated images against the
evaluator's features), and downstream accuracy is then measured once for the choice.

    OMP_NUM_THREADS=1 FEDGEN_DATA_DIR=../shared/data/mnist python simulations/probe_sampling.py \\
        configs/mnist_vqvae.yaml runs/probe/prior.pt --temperature 0.4 0.5 0.7 --guidance 0 0.5
    python simulations/probe_sampling.py RUN/config.yaml RUN/checkpoints/round_005.safetensors \\
        --latent-scale 1.0 1.2 --samples 10000 --downstream --set evaluation.downstream_seeds=3
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from fedgen.config import load_config
from fedgen.data import NUM_CLASSES
from fedgen.evaluation import Evaluator
from fedgen.files import load_checkpoint
from fedgen.models import build_model

warnings.filterwarnings("ignore", message="Secure RNG turned off")


def load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return load_checkpoint(Path(path))
    return torch.load(path)


def scale_latents(model: torch.nn.Module, scale: float) -> None:
    """Draw an `mmd` generator's latents with standard deviation `scale` instead of 1: wider
    (or narrower) variety from the same weights, post-processing like a temperature."""
    if not hasattr(model, "generator"):
        raise SystemExit("--latent-scale applies to model.type=mmd only")
    gen = model.generator
    draw = gen.sample_latent
    gen.sample_latent = lambda n, generator=None: draw(n, generator) * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the YAML config the weights were trained with")
    ap.add_argument("weights", help="a state_dict (.pt from probe_quality --save, or .safetensors)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0])
    ap.add_argument(
        "--latent-scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="model.type=mmd: draw the generator's latents with this standard deviation",
    )
    ap.add_argument("--samples", type=int, default=2000, help="images per setting for LC and FD")
    ap.add_argument("--downstream", action="store_true", help="also downstream accuracy")
    ap.add_argument("--set", action="append", default=[], help="key.sub=value override")
    ap.add_argument("--log", default="runs/probe_sampling.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.set, f"evaluation.samples={args.samples}"])
    if cfg.model.type not in ("vqvae", "mmd"):
        raise SystemExit(f"{args.config}: sampling settings apply to model.type vqvae and mmd")
    state = load_state(args.weights)
    evaluator = Evaluator(cfg, log=None)
    _ = evaluator.evaluator  # trained or loaded before the clock starts
    settings = [
        (g, t, s) for g in args.guidance for t in args.temperature for s in args.latent_scale
    ]
    for guidance, temperature, scale in settings:
        model_cfg = cfg.model.model_copy(
            update={"prior_temperature": temperature, "prior_guidance": guidance}
        )
        model = build_model(model_cfg, NUM_CLASSES)
        model.load_state_dict(state)
        if scale != 1.0:
            scale_latents(model, scale)
        started = time.perf_counter()
        q = evaluator.quality(model, args.downstream)
        row = {
            "weights": args.weights,
            "temperature": temperature,
            "guidance": guidance,
            "latent_scale": scale,
            "samples": args.samples,
            "seconds": round(time.perf_counter() - started, 1),
            **{
                k: round(float(q[k]), 4)
                for k in (
                    "label_consistency",
                    "frechet_distance",
                    "downstream_accuracy",
                    "downstream_accuracy_min",
                    "downstream_accuracy_max",
                )
                if q.get(k) is not None
            },
        }
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
