# SPDX-License-Identifier: Apache-2.0
"""The neural field (hash grid + small MLP -> density and albedo) and the environment-map background.

Density is ``act(raw + blob(x))`` with ``act`` softplus or exp and DreamFusion's density blob
``blob(x) = blob_density * exp(-|x|^2 / (2 (blob_radius * bound)^2)) + density_shift``, so the first renders
show one soft object in the centre and empty space is empty (the occupancy grid can skip it). Albedo is a
sigmoid. Normals are ``n = -grad(density) / |grad(density)|``, analytic (through the hash grid's spatial
Jacobian, differentiable so a loss on normals trains the field) or by central finite differences.

Example:
    >>> import torch
    >>> from fastdream.config import FieldConfig, resolve, RunConfig
    >>> fcfg = resolve(RunConfig(prompt="x", device="cpu")).field
    >>> f = NeuralField(fcfg, bound=1.0)
    >>> sigma, rho = f(torch.zeros(5, 3))
    >>> sigma.shape, rho.shape, bool(sigma[0] > 1.0)
    (torch.Size([5]), torch.Size([5, 3]), True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdream.config import FieldConfig
from fastdream.ops import HashGridConfig, hash_encode, hash_encode_with_jacobian, init_hash_table


class NeuralField(nn.Module):
    """Hash-grid field inside the sphere of radius ``bound``.

    Parameters: ``table`` [L, 2**T, F] (fp32 master copy; the op may read it in fp16 on CUDA) and the MLP.
    """

    def __init__(self, cfg: FieldConfig, bound: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.log2_table_size is None or cfg.finest_resolution is None:
            raise ValueError("FieldConfig has unresolved 'auto' fields; call fastdream.config.resolve first")
        self.cfg = cfg
        self.bound = float(bound)
        self.grid_cfg = HashGridConfig(
            levels=cfg.levels,
            features=cfg.features,
            log2_table_size=cfg.log2_table_size,
            base_resolution=cfg.base_resolution,
            finest_resolution=cfg.finest_resolution,
            bound=self.bound,
        )
        self.table = nn.Parameter(init_hash_table(self.grid_cfg, generator=generator))
        dims = [cfg.levels * cfg.features] + [cfg.hidden] * (cfg.hidden_layers + 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(cfg.hidden, 4)  # raw density, albedo logits
        if generator is not None:  # deterministic MLP init from the run's generator
            with torch.no_grad():
                for lin in [*self.hidden, self.out]:
                    bound_w = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.uniform_(-bound_w, bound_w, generator=generator)
                    lin.bias.uniform_(-bound_w, bound_w, generator=generator)

    # -- pieces -----------------------------------------------------------------------------------------

    def blob(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
        r = self.cfg.blob_radius * self.bound
        return self.cfg.blob_density * torch.exp(-x.float().square().sum(-1) / (2 * r * r)) + self.cfg.density_shift

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        if self.cfg.density_activation == "exp":
            return torch.exp(raw.clamp(max=15.0))  # clamp: exp overflow in fp16/fp32 gives inf gradients
        return F.softplus(raw)

    def _mlp(self, enc: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, masks = enc, []
        for lin in self.hidden:
            h = lin(h)
            masks.append(h > 0)
            h = torch.relu(h)
        return self.out(h), masks

    def _heads(self, raw: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = raw[:, 0].float() + self.blob(x)
        return self._activate(pre), torch.sigmoid(raw[:, 1:].float()), pre

    # -- public -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3] world points -> (density [N], albedo [N, 3]), both float32."""
        raw, _ = self._mlp(hash_encode(x, self.table, self.grid_cfg))
        sigma, rho, _ = self._heads(raw, x)
        return sigma, rho

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3] -> [N] density (float32)."""
        return self.forward(x)[0]

    def density_and_normals(
        self, x: torch.Tensor, method: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, 3] -> (density [N], albedo [N, 3], normals [N, 3] unit, n = -grad(density)/|grad(density)|).

        ``method``: "analytic" (default from the config) or "finite_difference". Normals are differentiable
        w.r.t. the field's parameters in both.
        """
        method = method or self.cfg.normals
        if method == "finite_difference":
            sigma, rho = self.forward(x)
            eps = 1e-2 * self.bound
            offs = torch.eye(3, device=x.device, dtype=x.dtype) * eps
            pts = torch.cat([x[:, None] + offs, x[:, None] - offs], 1).reshape(-1, 3)  # [N*6, 3]
            d = self.density(pts).reshape(-1, 2, 3)
            grad = (d[:, 0] - d[:, 1]) / (2 * eps)
            return sigma, rho, -F.normalize(grad, dim=-1, eps=1e-12)
        if method != "analytic":
            raise ValueError(f"method: expected 'analytic' or 'finite_difference', got {method!r}")
        enc, jac = hash_encode_with_jacobian(x, self.table, self.grid_cfg)  # [N, D], [N, D, 3]
        raw, masks = self._mlp(enc)
        sigma, rho, _ = self._heads(raw, x)
        # d raw_density / d enc by hand through the ReLU MLP: cheap, and differentiable w.r.t. the weights.
        g = self.out.weight[0].float().expand(x.shape[0], -1)
        for lin, m in zip(reversed(self.hidden), reversed(masks)):
            g = (g * m) @ lin.weight.float()
        grad = torch.bmm(g[:, None, :], jac.float())[:, 0]  # [N, 3]
        r = self.cfg.blob_radius * self.bound
        grad = grad - (self.blob(x) - self.cfg.density_shift)[:, None] * x.float() / (r * r)
        # act' > 0 scales the gradient but not its direction: normalise the pre-activation gradient.
        return sigma, rho, -F.normalize(grad, dim=-1, eps=1e-12)


class Background(nn.Module):
    """Environment map: a small MLP of the positionally encoded ray direction -> RGB in [0, 1]."""

    def __init__(self, frequencies: int = 4, hidden: int = 32, generator: torch.Generator | None = None):
        super().__init__()
        self.frequencies = frequencies
        d_in = 3 + 6 * frequencies
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        if generator is not None:
            with torch.no_grad():
                for lin in (self.net[0], self.net[2]):
                    b = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.uniform_(-b, b, generator=generator)
                    lin.bias.uniform_(-b, b, generator=generator)

    def encode(self, dirs: torch.Tensor) -> torch.Tensor:  # [R, 3] -> [R, 3 + 6F]
        freqs = 2.0 ** torch.arange(self.frequencies, device=dirs.device, dtype=dirs.dtype) * math.pi
        ang = dirs[:, None, :] * freqs[None, :, None]  # [R, F, 3]
        return torch.cat([dirs, torch.sin(ang).flatten(1), torch.cos(ang).flatten(1)], -1)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:  # [R, 3] unit directions -> [R, 3]
        return torch.sigmoid(self.net(self.encode(dirs)).float())
