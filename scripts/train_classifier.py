"""Train the shipped MNIST digit classifier (ddim/weights/classifier.safetensors).

    python scripts/train_classifier.py [--epochs 20] [--out ddim/weights/classifier.safetensors]

Trains on the 4,500 training digits of MNIST-5k and prints the accuracy on the 500 held-out ones.
The checking network (another architecture and seed, fp16 storage):

    python scripts/train_classifier.py --arch check --seed 1 --epochs 16 --half \
        --out ddim/weights/classifier_check.safetensors
"""

import argparse
import time

from ddim.classifier import default_classifier_path, save_classifier, train_classifier
from ddim.data import mnist5k_split

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(default_classifier_path()))
    ap.add_argument("--arch", default="a", choices=["a", "check"], help="DigitClassifier or CheckClassifier")
    ap.add_argument("--half", action="store_true", help="store float16 weights")
    args = ap.parse_args()
    train, held = mnist5k_split("train"), mnist5k_split("holdout")
    tic = time.perf_counter()
    model = train_classifier(
        train.images, train.labels, epochs=args.epochs, seed=args.seed, progress=True, arch=args.arch
    )
    _, pred = model.predict_features(held.images)
    acc = (pred == held.labels).float().mean().item()
    print(f"held-out accuracy {acc:.4f} ({len(held)} digits), {time.perf_counter() - tic:.0f} s")
    save_classifier(model, args.out, half=args.half)
    print(f"saved {args.out}")
