"""The vision towers (CLIP for LLaVA-1.5, SigLIP for LLaVA-OneVision) and the LLaVA projector.

Shape legend: B images, C channels, P patches per side, N = P*P patch tokens,
E vision width, W text width, H heads, D head dim.

Module names follow the Hugging Face CLIP checkpoint. Only the layers up to the deepest
requested feature layer run: LLaVA-1.5 reads layer -2, so the last layer is skipped.
SigLIP is CLIP's encoder layer without the class token and the pre-layernorm, with a
biased patch embedding and a GELU-tanh MLP; neither tower's post-layernorm is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loupe.config import VisionConfig, VLMConfig
from loupe.errors import ConfigError
from loupe.nn.attention import Kernel, attend, row_attention

# Whose attention a probed layer reports: the class token's row (CLIP; computed explicitly,
# the other rows stay fused) or the mean over every row (a tower without a class token:
# the attention each token receives, from the layer's full eager probabilities).
ProbeQuery = Literal["class", "mean"]
PROBE_QUERIES: tuple[ProbeQuery, ...] = ("class", "mean")


@dataclass
class LayerProbe:
    """What a probed encoder layer saw (the token-reduction peers' signals)."""

    attention: torch.Tensor  # (B, H, T) the probe query's float32 attention over the layer's T tokens
    keys: torch.Tensor  # (B, T, D) the layer's keys averaged over heads (VisionZip's merging metric)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}


def resample_position_embedding(pos: torch.Tensor, grid: int, class_token: bool = True) -> torch.Tensor:
    """Bicubic resampling of ViT position embeddings to a new patch grid.

    pos: (1 + P*P, E) with the class position first (or (P*P, E) without a class token);
    returns (1 + grid*grid, E) (or (grid*grid, E)). Same arithmetic as transformers'
    `interpolate_pos_encoding` (bicubic, no corner alignment), so interpolated encodings match it.
    """
    lead = 1 if class_token else 0
    old = int((pos.shape[0] - lead) ** 0.5)
    if old == grid:
        return pos
    cls_pos, patch_pos = pos[:lead], pos[lead:]
    patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, E, P, P)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid * grid, -1)  # (grid*grid, E)
    return torch.cat([cls_pos, patch_pos], dim=0)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, E, P, P)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, E)
        cls = self.class_embedding.expand(b, 1, -1)  # (B, 1, E)
        pos = resample_position_embedding(self.position_embedding.weight, h // self.patch_size)  # (1+N, E)
        return torch.cat([cls, patches], dim=1) + pos  # (B, 1+N, E)


class SiglipEmbeddings(nn.Module):
    """Patch embedding with bias plus learned positions; no class token."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = pixels.shape[-1]
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, E, P, P)
        pos = resample_position_embedding(self.position_embedding.weight, h // self.patch_size, class_token=False)
        return patches.flatten(2).transpose(1, 2) + pos  # (B, N, E)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        e = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.out_proj = nn.Linear(e, e)

    def forward(self, x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, 1+N, D)

        out, _ = attend(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), kernel=kernel)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, 1+N, E)

    def probed(self, x: torch.Tensor, kernel: Kernel, query: ProbeQuery) -> tuple[torch.Tensor, LayerProbe]:
        """`forward`, and the probe: `query`'s attention (B, H, T) and the head-mean keys."""
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if query == "class":
            out, _ = attend(q, k, v, kernel=kernel)
            every = torch.ones(b, 1, n, dtype=torch.bool, device=x.device)
            _, probs = row_attention(q[:, :, :1], k, None, every)  # (B, H, 1, T)
            seen = probs[:, :, 0]  # (B, H, T)
        else:
            out, probs = attend(q, k, v, kernel=kernel, need_probs=True)  # probs (B, H, T, T)
            seen = probs.float().mean(2)  # (B, H, T): attention received, averaged over the rows
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, T, E)
        return out, LayerProbe(seen, k.mean(1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    checkpointed: bool = False  # recompute in backward when the tower trains (see `DecoderLayer`)

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._layer, x, kernel, use_reentrant=False)
        return self._layer(x, kernel)

    def _layer(self, x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), kernel)
        return x + self.mlp(self.layer_norm2(x))

    def probed(self, x: torch.Tensor, kernel: Kernel, query: ProbeQuery) -> tuple[torch.Tensor, LayerProbe]:
        attn, probe = self.self_attn.probed(self.layer_norm1(x), kernel, query)
        x = x + attn
        return x + self.mlp(self.layer_norm2(x)), probe


class VisionTower(nn.Module):
    """CLIP ViT returning the hidden states LLaVA reads (before post-layernorm)."""

    has_class_token = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden state 0: (B, 1+N, E), the embeddings after the pre-layernorm."""
        return self.pre_layrnorm(self.embeddings(pixels))

    def forward(self, pixels: torch.Tensor, feature_layers: list[int], kernel: Kernel = "sdpa") -> torch.Tensor:
        """pixels (B, C, S, S) with S a multiple of the patch size -> (B, 1+N, E * len(feature_layers))
        ((B, N, ...) for a tower without a class token).

        Hidden state i is the input of layer i (0 = the embeddings), as in transformers'
        `hidden_states`; negative indices count from the last layer's output.
        """
        return self._trace(pixels, feature_layers, kernel)[0]

    def trace(self, pixels: torch.Tensor, feature_layers: list[int], kernel: Kernel = "sdpa",
              probes: tuple[int, ...] = (), query: ProbeQuery = "class") -> tuple[torch.Tensor, dict[int, LayerProbe]]:
        """`forward`'s features (class token included), and a `LayerProbe` of each encoder
        layer in `probes` (0-based layer indices; `feature_layer_index` names the one whose
        output a feature layer reads). An entry point of its own beside `forward` (FSDP2
        gathers the tower around either; neither calls the other)."""
        return self._trace(pixels, feature_layers, kernel, probes, query)

    def _trace(self, pixels: torch.Tensor, feature_layers: list[int], kernel: Kernel = "sdpa",
              probes: tuple[int, ...] = (), query: ProbeQuery = "class") -> tuple[torch.Tensor, dict[int, LayerProbe]]:
        count = self.cfg.num_layers + 1
        wanted = [i % count for i in feature_layers]
        x = self.embed(pixels)  # (B, 1+N, E)
        states, found = {0: x}, {}
        for i, layer in enumerate(self.layers[: max(wanted)]):
            if i in probes:
                x, found[i] = layer.probed(x, kernel, query)
            else:
                x = layer(x, kernel)
            states[i + 1] = x
        missing = sorted(set(probes) - set(found))
        if missing:
            raise ValueError(f"probe layers {missing} do not run: the features need layers 0..{max(wanted) - 1}")
        return torch.cat([states[i] for i in wanted], dim=-1), found

    def image_features(self, pixels: torch.Tensor, feature_layers: list[int], strategy: str,
                       kernel: Kernel = "sdpa") -> torch.Tensor:
        """The features LLaVA projects: (B, N, E*) patch tokens ("default" drops the class
        token) or (B, 1+N, E*) with it ("full")."""
        feats = self(pixels, feature_layers, kernel)  # (B, 1+N, E*)
        return feats[:, 1:] if strategy == "default" and self.has_class_token else feats


def feature_layer_index(cfg: VLMConfig) -> int:
    """The 0-based encoder layer whose output is the model's (single) feature layer."""
    if len(cfg.feature_layers) != 1:
        raise ConfigError(f"feature layers {cfg.feature_layers}: this method reads one encoder layer's attention "
                          "and needs a single feature layer")
    index = cfg.feature_layers[0] % (cfg.vision.num_layers + 1) - 1
    if index < 0:
        raise ConfigError(f"feature layer {cfg.feature_layers[0]} is the embeddings: no attention to read")
    return index


class SiglipTower(VisionTower):
    """SigLIP ViT (OneVision's so400m, cut to 26 layers): CLIP's layers, no class token, no
    pre-layernorm; its features are the last kept layer's output (strategy "full": all patches)."""

    has_class_token = False

    def __init__(self, cfg: VisionConfig) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixels)  # (B, N, E)


class Projector(nn.Module):
    """LLaVA's 2-layer MLP: vision features -> text embedding space."""

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        in_dim = cfg.vision.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(in_dim, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(features)))  # (B, N, W)
