"""``python -m caitlab.models``: every named variant with its parameters and MACs."""

from __future__ import annotations

import torch

from caitlab.models import count_macs, count_params, create_model, list_models


def main() -> None:
    print(f"{'variant':<26}{'img':>5}{'params (M)':>12}{'GMACs':>9}")
    for name in list_models():
        with torch.device("meta"):  # no memory, no time: M-48 is 356M parameters
            model = create_model(name)
        size = model.config["img_size"][0]
        print(f"{name:<26}{size:>5}{count_params(model) / 1e6:>12.1f}"
              f"{count_macs(model) / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
