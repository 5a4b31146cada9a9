"""HPCM: hierarchical progressive context model (Li et al., ICCV 2025), official architecture.

Data flow (research notes hpcm.md section 1):
    x -> g_a -> y (M, H/16, W/16) -> h_a -> z (N, H/64, W/64), coded with a per-channel GGM prior
    h_s(z_hat) -> hyperprior (scales, means) at y resolution
    y coded in 11 steps over 3 scales (s1: 2 steps on y/4, s2: 3 steps on y/2, s3: 6 steps on y);
    every step after the first predicts (scales, means) from the context flow and the latents
    decoded so far; window cross-attention carries the context from step to step, 1x1 convs
    merge it into the next scale.
    y_hat -> g_s -> x_hat

One loop (:meth:`HPCM._progressive`) drives training, compression and decompression, so encoder
and decoder cannot drift apart; a small "step coder" object decides what happens to each step's
latents (quantise, quantise + keep the symbols for the coder, or read symbols).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from hpcm.models import coder
from hpcm.models.entropy import GGM, build_indexes_conditional, build_indexes_z
from hpcm.models.layers import (
    CrossAttentionCell,
    SpatialPrior,
    analysis_transform,
    conv1x1,
    hyper_analysis,
    hyper_synthesis,
    synthesis_transform,
)
from hpcm.models.partition import BoundedCache, Partition, PartitionCache, label_maps
from hpcm.models.presets import HPCMConfig

# Official step wiring: the s2/s3 loops index their adaptor lists with [i - 1] from i = 0, so the
# first step of a scale uses the *last* adaptor. Kept so that released checkpoints mean the same.
ADAPTOR_ORDER = ((0,), (2, 0, 1), (5, 0, 1, 2, 3, 4))
# adaptive_params_list index per step: 0 for s1, 1..3 for s2, 4..9 for s3.
QUANT_VECTOR_ORDER = ((0,), (1, 2, 3), (4, 5, 6, 7, 8, 9))


def ste_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient (straight-through)."""
    return (torch.round(x) - x).detach() + x


def add_uniform_noise(x: Tensor, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """x + U(-0.5, 0.5). ``shard = (rank, world_size)``: x is that rank's slice of a batch split
    evenly over world_size processes; the noise of the whole batch is drawn (every rank from the
    same generator state) and the rank keeps its rows, so each sample's noise does not depend on the
    split.

    The noise is drawn in the logical (contiguous) element order whatever x's layout, so a
    channels_last run quantises with the same noise per element as a contiguous one (for a
    contiguous x this is exactly ``x + empty_like(x).uniform_``)."""
    rank, world_size = shard
    rows = x.shape[0]
    noise = torch.empty((rows * world_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    noise.uniform_(-0.5, 0.5)
    return x + (noise if world_size == 1 else noise[rank * rows : (rank + 1) * rows])


def combine_step(t: Tensor, parts: int) -> Tensor:
    """Sum the ``parts`` channel chunks of a masked step tensor: a dense (B, C/parts, h, w) tensor.

    Within one step every position of the grid is covered by exactly one chunk, so this packs the
    step's symbols densely in the official bitstream order.
    """
    return sum(t.chunk(parts, 1))


# Channel chunks per step on each grid: s1 steps split C in 2, s2 in 4, s3 in 8.
PARTS_PER_SCALE = (2, 4, 8)


class _Residuals:
    """y on the three grids, and each step's residual on the grid of its scale."""

    def __init__(self, part: Partition, y: Tensor):
        y_s2 = part.y_to_s2(y)  # y_to_s1 would recompute it
        self.grids = (part.s2_to_s1(y_s2), y_s2, y)

    def residual(self, scale: int, means: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(y - means) at the step's positions (zero elsewhere), and the masked means."""
        means_hat = means * mask
        return (self.grids[scale] - means_hat) * mask, means_hat


class _Quantizer(_Residuals):
    """Step coder for forward(): quantise y, sum residuals and scales per grid for the
    likelihood."""

    def __init__(self, part: Partition, y: Tensor, training: bool):
        super().__init__(part, y)
        self.part, self.training = part, training
        # Running sums over each scale's steps. The step masks are disjoint, so every element gets
        # one term plus exact zeros: the sums equal any other summation order. They start at +0,
        # as torch.sum does, so uncovered elements are +0 whatever the sign of the zero terms.
        self.res: list[Tensor | None] = [None, None, None]
        self.scales: list[Tensor | None] = [None, None, None]

    @staticmethod
    def _add(sums: list[Tensor | None], scale: int, t: Tensor) -> None:
        if sums[scale] is None:
            sums[scale] = torch.zeros_like(t)
        sums[scale].add_(t)  # autograd-safe: add saves no inputs, the buffer starts without grad

    def __call__(self, scale: int, scales: Tensor, means: Tensor, mask: Tensor) -> Tensor:
        y_res, means_hat = self.residual(scale, means, mask)
        y_q = ste_round(y_res) if self.training else torch.round(y_res)
        self._add(self.res, scale, y_res)
        self._add(self.scales, scale, scales * mask)
        return y_q + means_hat

    def full(self, sums: list[Tensor | None]) -> Tensor:
        """One of the per-grid sums (``self.res`` or ``self.scales``) placed on the y grid."""
        s1, s2, s3 = sums
        return self.part.s1_to_y(s1) + self.part.s2_to_y(s2) + s3


class _StepSymbols(_Residuals):
    """Step coder for compress(): eval quantisation; keeps every step's symbols and masked scales,
    packed densely (:func:`combine_step`) and flattened, in bitstream order."""

    def __init__(self, part: Partition, y: Tensor):
        super().__init__(part, y)
        self.symbols: list[Tensor] = []
        self.scales: list[Tensor] = []

    def __call__(self, scale: int, scales: Tensor, means: Tensor, mask: Tensor) -> Tensor:
        y_res, means_hat = self.residual(scale, means, mask)
        y_q = torch.round(y_res)
        parts = PARTS_PER_SCALE[scale]
        self.symbols.append(combine_step(y_q, parts).reshape(-1))
        self.scales.append(combine_step(scales * mask, parts).reshape(-1))
        return y_q + means_hat


@dataclass(frozen=True)
class CodedSymbols:
    """What :meth:`HPCM.compress` writes for one image, on the host, with the coder table of each
    symbol."""

    y_symbols: Tensor  # (n,) integer-valued float32, the 11 steps in bitstream order
    y_indexes: Tensor  # (n,) int32 rows of the y tables
    z_symbols: Tensor  # (1, N, h, w) integer-valued float32
    z_indexes: Tensor  # (1, N, h, w) int32 rows of the z tables (the channel)


class _Reader:
    """Step coder for decompress(): symbols come from the rANS stream instead of from y."""

    def __init__(self, decoder, tables: coder.CoderTables, scale_table: Tensor):
        self.decoder, self.tables, self.scale_table = decoder, tables, scale_table

    def __call__(self, scale: int, scales: Tensor, means: Tensor, mask: Tensor) -> Tensor:
        parts = PARTS_PER_SCALE[scale]
        # indexes built on the host, where the decoder needs them: one device->host copy per step
        indexes = build_indexes_conditional(
            combine_step(scales * mask, parts).cpu(), self.scale_table
        )
        symbols = coder.decode_symbols(self.decoder, indexes, self.tables).to(
            means.device, means.dtype
        )
        y_q = torch.cat([symbols] * parts, dim=1) * mask
        return y_q + means * mask


StepCoder = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class HPCM(nn.Module):
    """The HPCM codec. Build it with :func:`hpcm.models.build_model`."""

    def __init__(self, config: HPCMConfig | None = None, name: str = "HPCM_Base"):
        super().__init__()
        cfg = config or HPCMConfig()
        self.config = cfg
        self.name = name
        M, N = cfg.M, cfg.N
        self.M, self.N = M, N
        # Registration order reproduces the official state-dict key order.
        self.means_hyper = nn.Parameter(torch.zeros(1, N, 1, 1))
        self.scales_hyper = nn.Parameter(torch.ones(1, N, 1, 1))
        coder.register_coder_buffers(self)
        self.entropy_estimation = GGM()

        pr, mr = cfg.partial_ratio, cfg.mlp_ratio
        self.g_a = analysis_transform(M, cfg.transform_channels, cfg.analysis_blocks, pr, mr)
        self.g_s = synthesis_transform(M, cfg.transform_channels, cfg.synthesis_blocks, pr, mr)
        self.h_a = hyper_analysis(M, N, cfg.hyper_blocks, pr, mr)
        self.h_s = hyper_synthesis(M, N, cfg.hyper_blocks, pr, mr)

        self.y_spatial_prior_adaptor_list_s1 = nn.ModuleList(
            conv1x1(3 * M, 3 * M) for _ in range(1)
        )
        self.y_spatial_prior_adaptor_list_s2 = nn.ModuleList(
            conv1x1(3 * M, 3 * M) for _ in range(3)
        )
        self.y_spatial_prior_adaptor_list_s3 = nn.ModuleList(
            conv1x1(3 * M, 3 * M) for _ in range(6)
        )
        self.y_spatial_prior_s1_s2 = SpatialPrior(M, *cfg.prior_s1_s2_blocks)
        self.y_spatial_prior_s3 = SpatialPrior(M, *cfg.prior_s3_blocks)
        self.adaptive_params_list = nn.ParameterList(
            nn.Parameter(torch.ones(1, 3 * M, 1, 1)) for _ in range(10)
        )

        w1, w2, w3 = cfg.attn_windows
        self.attn_s1 = CrossAttentionCell(2 * M, w1, cfg.attn_heads)
        self.attn_s2 = CrossAttentionCell(2 * M, w2, cfg.attn_heads)
        self.attn_s3 = CrossAttentionCell(2 * M, w3, cfg.attn_heads)
        self.context_net = nn.ModuleList(conv1x1(2 * M, 2 * M) for _ in range(2))

        self._partitions = PartitionCache(M)
        # (M, Hy, Wy) int64 pairs: ~8 MB per Kodak size for Base, so bounded like the partitions
        self._label_cache = BoundedCache(self._partitions.max_entries)
        # (3, M, Hy, Wy) scale one-hots of scale_bits, which runs every training step
        self._scale_one_hot_cache = BoundedCache(self._partitions.max_entries)
        self._tables_built_for: Tensor | None = None  # scales_hyper the z tables were built from
        # (rank, world_size) of data-parallel training: see add_uniform_noise (not saved: a run
        # setting)
        self.noise_shard: tuple[int, int] = (0, 1)

    # ------------------------------------------------------------------ geometry and labels
    @property
    def pad_multiple(self) -> int:
        return self.config.pad_multiple

    def _check_input(self, x: Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"input must be 4-D (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(
                f"input must have 3 channels (RGB), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"input is empty: shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input must be a floating-point tensor in [0, 1], got {x.dtype}")
        h, w = x.shape[-2:]
        p = self.pad_multiple
        if h % p or w % p:
            raise ValueError(
                f"{self.name} needs H and W to be multiples of {p}, got {h}x{w}; "
                "use hpcm.models.pad_image(x, model.pad_multiple) and crop_image afterwards"
            )

    def _labels(self, which: int, height: int, width: int, device) -> Tensor:
        key = (height, width, str(torch.device(device) if device is not None else "cpu"))
        maps = self._label_cache.get(
            key, lambda: torch.stack(label_maps(self.M, height, width, device))
        )
        return maps[which]

    def scale_map(self, y_height: int, y_width: int, device=None) -> Tensor:
        """LongTensor (M, Hy, Wy): the scale (1 = s1, 2 = s2, 3 = s3) that codes each y element."""
        return self._labels(0, y_height, y_width, device)

    def step_map(self, y_height: int, y_width: int, device=None) -> Tensor:
        """LongTensor (M, Hy, Wy): the coding step (1..11) of each y element."""
        return self._labels(1, y_height, y_width, device)

    def scale_bits(self, likelihood_y: Tensor) -> Tensor:
        """(B, 3) bits of s1, s2, s3: -log2 p summed over each scale's elements (differentiable)."""
        if likelihood_y.dim() != 4 or likelihood_y.shape[1] != self.M:
            raise ValueError(
                f"likelihood_y must be (B, {self.M}, Hy, Wy), got {tuple(likelihood_y.shape)}"
            )
        height, width = likelihood_y.shape[-2:]
        device, dtype = likelihood_y.device, likelihood_y.dtype
        one_hot = self._scale_one_hot_cache.get(
            (height, width, str(device), dtype),
            lambda: torch.stack([self.scale_map(height, width, device) == s for s in (1, 2, 3)]).to(
                dtype
            ),
        )
        bits = -torch.log2(likelihood_y)
        return torch.einsum("bchw,schw->bs", bits, one_hot)

    # ------------------------------------------------------------------ the progressive context
    # model
    def _progressive(self, params: Tensor, code_step: StepCoder) -> tuple[Tensor, Partition]:
        """Run the 11 coding steps; returns y_hat on the y grid (and the partition used)."""
        _, _, H, W = params.shape
        part = self._partitions.get(H, W, params.device, params.dtype)
        scales_all, means_all = params.chunk(2, 1)
        adaptors = (
            self.y_spatial_prior_adaptor_list_s1,
            self.y_spatial_prior_adaptor_list_s2,
            self.y_spatial_prior_adaptor_list_s3,
        )
        priors = (self.y_spatial_prior_s1_s2, self.y_spatial_prior_s1_s2, self.y_spatial_prior_s3)
        attns = (self.attn_s1, self.attn_s2, self.attn_s3)

        # s1: the first step is coded with the hyperprior alone; its params start the context flow.
        context_next = torch.cat((part.y_to_s1(scales_all), part.y_to_s1(means_all)), dim=1)
        masks = part.step_masks[0]
        y_hat = code_step(0, *context_next.chunk(2, 1), masks[0])
        steps = (masks[1:], part.step_masks[1], part.step_masks[2])
        for scale in range(3):
            if scale > 0:  # merge: coarse context + hyperprior at the new positions, 1x1 conv
                lift = part.s1_to_s2 if scale == 1 else part.s2_to_y
                hyper = part.s2_hyper if scale == 1 else part.s3_hyper
                y_hat = lift(y_hat)
                context = torch.cat([lift(t) for t in context_next.chunk(2, 1)], dim=1)
                context = context + torch.cat((hyper(scales_all), hyper(means_all)), dim=1)
                context_next = self.context_net[scale - 1](context)
            for i, mask in enumerate(steps[scale]):
                inputs = torch.cat((context_next, y_hat), dim=1)
                adaptor = adaptors[scale][ADAPTOR_ORDER[scale][i]]
                quant = self.adaptive_params_list[QUANT_VECTOR_ORDER[scale][i]]
                context = priors[scale](adaptor(inputs), quant)
                if (
                    scale < 2 or i < len(steps[2]) - 1
                ):  # the last step's context flow would feed nothing
                    context_next = attns[scale](context, context_next)
                y_hat = y_hat + code_step(scale, *context.chunk(2, 1), mask)
        return y_hat, part

    # ------------------------------------------------------------------ training / estimation
    def forward(self, x: Tensor) -> dict:
        self._check_input(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_res = z - self.means_hyper
        if self.training:
            z_hat = ste_round(z_res) + self.means_hyper
            z_likelihoods = self.entropy_estimation(
                add_uniform_noise(z_res, self.noise_shard), self.scales_hyper
            )
        else:
            z_res_hat = torch.round(z_res)
            z_hat = z_res_hat + self.means_hyper
            z_likelihoods = self.entropy_estimation(z_res_hat, self.scales_hyper)

        # Rounding and likelihoods in float32 even under bf16 autocast: bf16 cannot hold the
        # integer part of large latents. (float32 and float64 tensors stay as they are.)
        y, params = (
            t if t.dtype in (torch.float32, torch.float64) else t.float()
            for t in (y, self.h_s(z_hat))
        )
        quantizer = _Quantizer(
            self._partitions.get(*params.shape[-2:], params.device, params.dtype), y, self.training
        )
        y_hat, _ = self._progressive(params, quantizer)
        y_res = quantizer.full(quantizer.res)
        scales_y = quantizer.full(quantizer.scales)
        x_hat = self.g_s(y_hat)
        noisy = add_uniform_noise(y_res, self.noise_shard) if self.training else torch.round(y_res)
        y_likelihoods = self.entropy_estimation(noisy, scales_y)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # ------------------------------------------------------------------ real entropy coding
    def update(self, scale_table: Tensor | None = None, force: bool = False) -> bool:
        """Build the rANS CDF tables; returns False when current tables were kept."""
        current = self.scales_hyper.detach()
        up_to_date = (
            self.quantized_cdf_z.numel() > 0
            and self._tables_built_for is not None
            and torch.equal(self._tables_built_for.to(current.device), current)
        )
        if up_to_date and scale_table is None and not force:
            return False
        coder.update_coder_buffers(self, self.entropy_estimation, current, scale_table)
        self._tables_built_for = current.clone()
        return True

    def coded_symbols(self, x: Tensor) -> Iterator[CodedSymbols]:
        """Per image of ``x``: the y and z symbols :meth:`compress` codes, with their table indexes.

        One image at a time: the decoder runs with batch 1, and convolutions must see the same
        shapes on both sides for the scale indexes to agree bit for bit. Everything the coder needs
        reaches the host in one copy per image (symbols and scales of all 11 steps, z). The input
        and the tables are checked here, the images are coded as the iterator is consumed.
        """
        self._check_input(x)
        if self.scale_table.numel() == 0:
            raise RuntimeError("entropy coder tables are empty: call model.update() before coding")
        return self._coded_symbols(x, self.scale_table.cpu())

    @torch.no_grad()
    def _coded_symbols(self, x: Tensor, scale_table: Tensor) -> Iterator[CodedSymbols]:
        for image in x.split(1):
            y = self.g_a(image)
            z_res = torch.round(self.h_a(y) - self.means_hyper)
            params = self.h_s(z_res + self.means_hyper)
            steps = _StepSymbols(
                self._partitions.get(*params.shape[-2:], params.device, params.dtype), y
            )
            self._progressive(params, steps)
            host = torch.cat(steps.symbols + steps.scales + [z_res.reshape(-1)]).cpu()
            n_y = sum(t.numel() for t in steps.symbols)
            y_symbols, y_scales, z_symbols = host.split((n_y, n_y, z_res.numel()))
            yield CodedSymbols(
                y_symbols=y_symbols,
                y_indexes=build_indexes_conditional(y_scales, scale_table),
                z_symbols=z_symbols.view(z_res.shape),
                z_indexes=build_indexes_z(z_res.shape),
            )

    @torch.no_grad()
    def compress(self, x: Tensor) -> dict:
        """Encode each image of the batch into its own y and z rANS streams."""
        images = self.coded_symbols(x)
        tables_y, tables_z = coder.coder_tables(self, "y"), coder.coder_tables(self, "z")
        y_strings, z_strings = [], []
        shape = None
        for symbols in images:
            y_strings.append(coder.encode_stream(symbols.y_symbols, symbols.y_indexes, tables_y))
            z_strings.append(coder.encode_stream(symbols.z_symbols, symbols.z_indexes, tables_z))
            shape = tuple(symbols.z_symbols.shape[-2:])
        return {"strings": [y_strings, z_strings], "shape": shape}

    @torch.no_grad()
    def decompress(self, strings, shape) -> dict:
        """Decode the streams of :meth:`compress`; x_hat is clamped to [0, 1]."""
        if len(strings) != 2 or len(strings[0]) != len(strings[1]) or not strings[0]:
            raise ValueError("strings must be [y_strings, z_strings] with one entry per image")
        h, w = (int(v) for v in shape)
        tables_y, tables_z = coder.coder_tables(self, "y"), coder.coder_tables(self, "z")
        means_hyper = self.means_hyper
        indexes_z = build_indexes_z((1, self.N, h, w))  # same for every image
        scale_table = self.scale_table.cpu()
        images = []
        for y_string, z_string in zip(*strings):
            z_res = coder.decode_symbols(coder.make_decoder(z_string), indexes_z, tables_z)
            params = self.h_s(z_res.to(means_hyper.device, means_hyper.dtype) + means_hyper)
            reader = _Reader(coder.make_decoder(y_string), tables_y, scale_table)
            y_hat, _ = self._progressive(params, reader)
            images.append(self.g_s(y_hat).clamp_(0, 1))
        return {"x_hat": torch.cat(images, dim=0)}

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
    ):
        """Like nn.Module's, but coder tables of any size load (they are resized first)."""
        coder.resize_coder_buffers(self, state_dict)
        self._tables_built_for = None
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if (
            self.quantized_cdf_z.numel() > 0
        ):  # tables came with the file: valid for its scales_hyper
            self._tables_built_for = self.scales_hyper.detach().clone()
        return result
