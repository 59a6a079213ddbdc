"""A convolutional variational autoencoder, in one file.

References:
1) Kingma & Welling, "Auto-Encoding Variational Bayes", 2014: https://arxiv.org/abs/1312.6114
2) Rezende, Mohamed & Wierstra, "Stochastic Backpropagation ...", 2014: https://arxiv.org/abs/1401.4082
3) Rybkin, Daniilidis & Levine, "Simple and Effective VAE Training with Calibrated Decoders" (σ-VAE), 2021:
   https://arxiv.org/abs/2006.13202 (the learned shared decoder variance)

Encoder: stride-2 convolutions halve the image until it is (c, s, s), then one linear layer gives the mean
and log-variance of a Gaussian q(z|x). Decoder: the mirror image, ending in one "logit" per pixel. The
likelihood p(x|z) is Bernoulli with those logits, or Gaussian with mean sigmoid(logits) and a standard
deviation σ that is fixed or learned (one per image channel). The prior is N(0, I).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    image_channels: int = 1  # 1 for digits, 3 for faces
    image_size: int = 28  # square images; must be divisible by 2 ** len(channels)
    channels: tuple[int, ...] = (32, 64)  # one stride-2 conv per entry, each halving the image
    latent_dim: int = 16
    decoder: str = "bernoulli"  # "bernoulli" or "gaussian"
    sigma: float | None = None  # the gaussian decoder's fixed σ; None = learned

    @property
    def bottom(self) -> int:
        """Side of the smallest feature map, after every stride-2 conv."""
        return self.image_size >> len(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        layers, c_in = [], config.image_channels
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.to_latent = nn.Linear(c_in * config.bottom**2, 2 * config.latent_dim)

    def forward(self, x):
        h = self.conv(x).flatten(1)  # (B, c * s * s)
        mu, logvar = self.to_latent(h).chunk(2, dim=-1)  # (B, d) each
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        chans = list(reversed(config.channels))
        self.shape = (chans[0], config.bottom, config.bottom)
        self.from_latent = nn.Linear(config.latent_dim, chans[0] * config.bottom**2)
        layers = []
        for c_in, c_out in zip(chans, chans[1:] + [config.image_channels]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)]
        self.deconv = nn.Sequential(*layers)  # no activation at the end: these are logits

    def forward(self, z):
        h = self.from_latent(z).view(-1, *self.shape)  # (B, c, s, s)
        return self.deconv(h)  # (B, C, H, W)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        assert config.image_size % 2 ** len(config.channels) == 0, "the Config validator checks this"
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.decoder == "gaussian" and config.sigma is None:
            self.log_sigma = nn.Parameter(torch.zeros(config.image_channels))  # σ = 1 at init; see configure_optimizers

    def init_weights(self, generator: torch.Generator) -> VAE:
        """PyTorch's default uniform init, drawn from `generator` instead of the global RNG; zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                nn.init.zeros_(m.bias)
        return self

    def sigma(self) -> torch.Tensor:
        """The gaussian decoder's σ, shaped to broadcast over (B, C, H, W)."""
        if self.config.sigma is not None:
            return torch.tensor(self.config.sigma)
        return self.log_sigma.float().exp().view(1, -1, 1, 1)

    def nll(self, logits, x):
        """-log p(x|z) per image, in nats. x: (B, C, H, W) in [0, 1]."""
        logits = logits.float()  # the likelihood in float32 even under bf16 autocast
        if self.config.decoder == "bernoulli":
            # the usual MNIST choice: the Bernoulli log-likelihood evaluated at grey levels in [0, 1]
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))  # (B,)
        sigma = self.sigma().to(x.device)
        z = (x - torch.sigmoid(logits)) / sigma
        return (0.5 * z**2 + torch.log(sigma) + 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))  # (B,)

    def forward(self, x, noise=None):
        """x: (B, C, H, W) in [0, 1]; noise: (B, d) standard normal draws for the reparameterisation (drawn here
        when None). Returns the decoder's logits and, per image, -log p(x|z) and KL(q(z|x) ‖ p(z)) in nats;
        their sum is the negative ELBO, the loss."""
        mu, logvar = self.encoder(x)
        mu, logvar = mu.float(), logvar.float()  # (B, d)
        if noise is None:
            noise = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * noise  # (B, d)
        logits = self.decoder(z)  # (B, C, H, W)
        kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(-1)  # (B,)
        return logits, self.nll(logits, x), kl

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n images from the prior, as the decoder's mean in [0, 1]: (n, C, H, W). The mean, not a draw from
        p(x|z): a Bernoulli draw would turn grey levels into salt-and-pepper noise, and Gaussian pixel noise
        is not part of the image either."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=device)  # (n, d)
        return torch.sigmoid(self.decoder(z).float())

    def configure_optimizers(self, lr: float) -> torch.optim.Optimizer:
        # Adam moves a parameter by about lr a step, so a learned log σ starting at 0 would need thousands of
        # steps to reach log 0.1; it gets a learning rate 30 times larger (it is one number per channel)
        sigma = [p for n, p in self.named_parameters() if n == "log_sigma"]
        rest = [p for n, p in self.named_parameters() if n != "log_sigma"]
        groups = [{"params": rest}] + ([{"params": sigma, "lr": 30 * lr}] if sigma else [])
        return torch.optim.Adam(groups, lr=lr)
