"""E(n)-equivariant graph networks (Satorras et al. 2021) in the EDM form (Hoogeboom et al. 2022).

Two models are provided:

* :class:`EGNNDenoiser` -- the diffusion network: maps noisy ``[positions | features]`` of a batch of
  molecules to an equivariant, zero-centre-of-mass position displacement and invariant feature outputs.
* :class:`EGNNPredictor` -- an invariant graph-level regressor used as the property predictor in EDM's
  conditional-generation evaluation.

Both use fully connected graphs inside each molecule (no self loops), optionally cut to a radius.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from domains.molecules.fragment import FragmentFrame

__all__ = [
    "EGNNDenoiser",
    "EGNNPredictor",
    "EquivariantBlock",
    "MolEGNN",
    "GCL",
    "CoordUpdate",
    "NoiseLevelEmbedding",
    "fully_connected_edges",
    "remove_mean",
]


def fully_connected_edges(batch: Tensor, num_graphs: int | None = None, *, pos: Tensor | None = None,
                          radius: float | None = None) -> Tensor:
    """All ordered pairs ``(j -> i)``, ``i != j``, inside each graph of a sorted ``batch`` vector (Satorras et al. 2021).

    Returns ``edge_index`` of shape ``[2, sum_g n_g (n_g - 1)]`` with row 0 the source ``j`` and row 1
    the target ``i``, sorted by target. With ``pos`` [N, 3] and ``radius``, only the pairs at most ``radius``
    apart (the one implementation: the EGNNs cache it per batch, ``data.QM9Dataset`` stores it per molecule).
    """
    if radius is not None:
        if pos is None:
            raise ValueError("fully_connected_edges: radius needs pos")
        edge_index = fully_connected_edges(batch, num_graphs)
        src, dst = edge_index
        return edge_index[:, (pos[src] - pos[dst]).norm(dim=-1) <= radius]
    device = batch.device
    n = batch.numel()
    counts = torch.bincount(batch, minlength=num_graphs or 0)
    ptr = torch.cumsum(counts, 0) - counts  # first node of each graph
    node = torch.arange(n, device=device)
    deg = (counts - 1).clamp_min(0)[batch]  # neighbours of each node
    dst = torch.repeat_interleave(node, deg)
    # k-th neighbour of node i (local index) skips i itself: local j = k + [k >= local i].
    first_edge = torch.cumsum(deg, 0) - deg
    k = torch.arange(dst.numel(), device=device) - torch.repeat_interleave(first_edge, deg)
    local_i = (node - ptr[batch])[dst]
    src = ptr[batch[dst]] + k + (k >= local_i).long()
    return torch.stack([src, dst], dim=0)


def remove_mean(pos: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Subtract each graph's centre of mass (unit masses) from ``pos`` (Hoogeboom et al. 2022)."""
    mean = scatter(pos, batch, dim=0, dim_size=num_graphs, reduce="mean")
    return pos - mean[batch]


class _EdgeCache:
    """Small LRU cache of fully connected ``edge_index`` tensors keyed by the per-graph atom counts."""

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._store: OrderedDict[tuple, Tensor] = OrderedDict()

    def __call__(self, batch: Tensor, num_graphs: int) -> Tensor:
        counts = torch.bincount(batch, minlength=num_graphs)
        key = (batch.device, tuple(counts.tolist()))
        hit = self._store.get(key)
        if hit is not None:
            self._store.move_to_end(key)
            return hit
        edge_index = fully_connected_edges(batch, num_graphs)
        self._store[key] = edge_index
        if len(self._store) > self.maxsize:
            self._store.popitem(last=False)
        return edge_index


def _edges(
    cache: _EdgeCache, batch: Tensor, pos: Tensor, num_graphs: int, radius: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Edges (fully connected, optionally within ``radius`` at ``pos``), differences ``x_i - x_j`` and squared distances."""
    edge_index = cache(batch, num_graphs)
    src, dst = edge_index
    diff = pos.index_select(0, dst) - pos.index_select(0, src)
    radial = diff.pow(2).sum(dim=-1, keepdim=True)
    if radius is not None:
        keep = radial.squeeze(-1) < radius * radius
        edge_index, diff, radial = edge_index[:, keep], diff[keep], radial[keep]
    return edge_index, diff, radial


class NoiseLevelEmbedding(nn.Module):
    """Fixed sinusoidal features of the per-molecule noise level, plus its scaled raw value (Hoogeboom et al. 2022)."""

    def __init__(self, num_frequencies: int = 8, min_freq: float = 0.1, max_freq: float = 4.0, scale: float = 6.0) -> None:
        super().__init__()
        self.scale = scale
        freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), num_frequencies)
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 1 + 2 * num_frequencies

    def forward(self, c_noise: Tensor) -> Tensor:
        """``[B]`` noise levels to ``[B, out_dim]`` features."""
        t = c_noise.reshape(-1, 1)
        angles = t * self.freqs.to(t.dtype)
        return torch.cat([t / self.scale, torch.sin(angles), torch.cos(angles)], dim=-1)


class GCL(MessagePassing):
    r"""Invariant graph convolutional sub-layer of EGNN (Satorras et al. 2021, eqs. 3, 5, 6; Hoogeboom et al. 2022).

    .. math::
        m_{ij} = \phi_e(h_i, h_j, a_{ij}),\quad
        m_{ij} \leftarrow m_{ij}\,\sigma(w^\top m_{ij}) \text{ (attention)},\quad
        h_i \leftarrow h_i + \phi_h\Big(h_i, \tfrac{1}{Z}\sum_{j \ne i} m_{ij}\Big)

    Args:
        hidden: node feature width.
        edge_dim: width of the invariant edge attributes :math:`a_{ij}` (squared distances).
        attention: gate each message by a sigmoid of a linear map of itself.
        normalization_factor: :math:`Z`, the divisor of the summed messages.

    Shapes:
        - input: node features :math:`(N, H)`, edge index :math:`(2, E)`, edge attributes :math:`(E, D_e)`
        - output: node features :math:`(N, H)`
    """

    def __init__(self, hidden: int, edge_dim: int, attention: bool = True, normalization_factor: float = 1.0) -> None:
        super().__init__(aggr="sum", flow="source_to_target")
        self.hidden = hidden
        self.edge_dim = edge_dim
        self.normalization_factor = normalization_factor
        # The first edge linear acts on [h_i, h_j, a_ij]; it is split into node-level parts so the
        # h-projections are computed once per node instead of once per edge (same function).
        self.edge_lin_i = nn.Linear(hidden, hidden)
        self.edge_lin_j = nn.Linear(hidden, hidden, bias=False)
        self.edge_lin_a = nn.Linear(edge_dim, hidden, bias=False)
        self.edge_lin2 = nn.Linear(hidden, hidden)
        self.att = nn.Linear(hidden, 1) if attention else None
        self.node_lin1 = nn.Linear(2 * hidden, hidden)
        self.node_lin2 = nn.Linear(hidden, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reinitialise all weights (PyTorch default Linear init on the concatenated input)."""
        super().reset_parameters()
        _reset_split_linear([self.edge_lin_i, self.edge_lin_j, self.edge_lin_a])
        for lin in (self.edge_lin2, self.att, self.node_lin1, self.node_lin2):
            if lin is not None:
                lin.reset_parameters()

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        """Update node features from invariant messages."""
        agg = self.propagate(edge_index, p=self.edge_lin_i(h), q=self.edge_lin_j(h), edge_attr=edge_attr, size=(h.size(0), h.size(0)))
        if self.normalization_factor != 1.0:
            agg = agg / self.normalization_factor
        out = self.node_lin2(F.silu(self.node_lin1(torch.cat([h, agg], dim=-1))))
        return h + out

    def message(self, p_i: Tensor, q_j: Tensor, edge_attr: Tensor) -> Tensor:
        """Edge message ``m_ij`` from the projected ``h_i``, ``h_j`` and the edge attributes."""
        m = F.silu(p_i + q_j + self.edge_lin_a(edge_attr))
        m = F.silu(self.edge_lin2(m))
        if self.att is not None:
            m = m * torch.sigmoid(self.att(m))
        return m

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden}, edge_dim={self.edge_dim}, attention={self.att is not None})"


class CoordUpdate(MessagePassing):
    r"""Equivariant coordinate update of EGNN with EDM's normalised differences (Satorras et al. 2021, eq. 4; Hoogeboom et al. 2022).

    .. math::
        x_i \leftarrow x_i + \frac{1}{Z}\sum_{j \ne i}
        \frac{x_i - x_j}{\lVert x_i - x_j \rVert + c}\; r\tanh\big(\phi_x(h_i, h_j, a_{ij})\big)

    (without ``tanh`` the factor is :math:`\phi_x` itself).

    Args:
        hidden: node feature width.
        edge_dim: width of the invariant edge attributes :math:`a_{ij}`.
        tanh: bound the per-edge factor by :math:`r \tanh(\cdot)`.
        coords_range: :math:`r`.
        normalization_factor: :math:`Z`.

    Shapes:
        - input: node features :math:`(N, H)`, positions :math:`(N, 3)`, edge index :math:`(2, E)`,
          edge attributes :math:`(E, D_e)`, normalised differences :math:`(E, 3)`
        - output: positions :math:`(N, 3)`
    """

    def __init__(
        self, hidden: int, edge_dim: int, tanh: bool = True, coords_range: float = 1.0, normalization_factor: float = 1.0
    ) -> None:
        super().__init__(aggr="sum", flow="source_to_target")
        self.hidden = hidden
        self.tanh = tanh
        self.coords_range = coords_range
        self.normalization_factor = normalization_factor
        self.lin_i = nn.Linear(hidden, hidden)
        self.lin_j = nn.Linear(hidden, hidden, bias=False)
        self.lin_a = nn.Linear(edge_dim, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, hidden)
        self.lin_out = nn.Linear(hidden, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reinitialise; the last layer gets Xavier-uniform with gain 0.001 so updates start tiny."""
        super().reset_parameters()
        _reset_split_linear([self.lin_i, self.lin_j, self.lin_a])
        self.lin2.reset_parameters()
        nn.init.xavier_uniform_(self.lin_out.weight, gain=0.001)

    def forward(self, h: Tensor, pos: Tensor, edge_index: Tensor, edge_attr: Tensor, coord_diff: Tensor) -> Tensor:
        """Return updated positions."""
        agg = self.propagate(
            edge_index, p=self.lin_i(h), q=self.lin_j(h), edge_attr=edge_attr, coord_diff=coord_diff, size=(h.size(0), h.size(0))
        )
        if self.normalization_factor != 1.0:
            agg = agg / self.normalization_factor
        return pos + agg

    def message(self, p_i: Tensor, q_j: Tensor, edge_attr: Tensor, coord_diff: Tensor) -> Tensor:
        """Per-edge displacement ``coord_diff * factor``; the factor's last layer and the product stay fp32 under
        bf16 autocast (``train.precision=bf16``), so positions are only moved by fp32 amounts."""
        m = F.silu(p_i + q_j + self.lin_a(edge_attr))
        hidden = F.silu(self.lin2(m))
        weight = self.lin_out.weight  # a method on an int8 dynamic-quantized Linear (--precision int8): fp32 input
        with torch.autocast(hidden.device.type, enabled=False):
            phi = self.lin_out(hidden.to(weight.dtype if isinstance(weight, Tensor) else torch.float32))
        if self.tanh:
            phi = torch.tanh(phi) * self.coords_range
        return coord_diff * phi

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden}, tanh={self.tanh}, coords_range={self.coords_range:g})"


def _reset_split_linear(parts: list[nn.Linear]) -> None:
    """Init linears that together form one Linear on the concatenation of their inputs, as nn.Linear would."""
    fan_in = sum(p.in_features for p in parts)
    bound = 1.0 / math.sqrt(fan_in)
    for p in parts:
        nn.init.uniform_(p.weight, -bound, bound)  # == kaiming_uniform_(a=sqrt(5)) on the full fan-in
        if p.bias is not None:
            nn.init.uniform_(p.bias, -bound, bound)


class EquivariantBlock(nn.Module):
    """A stack of invariant GCL sub-layers followed by one coordinate update (Hoogeboom et al. 2022, App. B)."""

    def __init__(
        self,
        hidden: int,
        sublayers: int = 2,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        edge_dim: int = 2,
    ) -> None:
        super().__init__()
        self.norm_constant = norm_constant
        # current squared distance + the fixed edge attributes (initial squared distance[, self-conditioning one])
        self.gcls = nn.ModuleList(GCL(hidden, edge_dim, attention, normalization_factor) for _ in range(sublayers))
        self.coord = CoordUpdate(hidden, edge_dim, tanh, coords_range, normalization_factor)

    def reset_parameters(self) -> None:
        """Reinitialise all sub-layers."""
        for gcl in self.gcls:
            gcl.reset_parameters()
        self.coord.reset_parameters()

    def forward(self, h: Tensor, pos: Tensor, edge_index: Tensor, radial0: Tensor) -> tuple[Tensor, Tensor]:
        """Update ``(h, pos)``; ``radial0`` are the fixed edge attributes (squared distances at the network input)."""
        src, dst = edge_index
        diff = pos.index_select(0, dst) - pos.index_select(0, src)
        radial = diff.pow(2).sum(dim=-1, keepdim=True)
        # 1e-8 keeps the gradient of the norm finite for coincident atoms.
        coord_diff = diff / (torch.sqrt(radial + 1e-8) + self.norm_constant)
        edge_attr = torch.cat([radial, radial0], dim=-1)
        for gcl in self.gcls:
            h = gcl(h, edge_index, edge_attr)
        pos = self.coord(h, pos, edge_index, edge_attr, coord_diff)
        return h, pos


class EGNNDenoiser(nn.Module):
    r"""EGNN diffusion network of EDM (Hoogeboom et al. 2022) built from E(n)-equivariant layers (Satorras et al. 2021).

    Node inputs are the invariant atom features, an embedding of the molecule's noise level and, when
    ``cond_dim > 0``, the molecule's properties (zeros plus an indicator channel for unconditional rows,
    for classifier-free guidance). The position output is the displacement ``x_out - x_in`` with each
    molecule's mean removed.

    Args:
        num_features: number of invariant atom features ``F``.
        hidden: node feature width.
        layers: number of equivariant blocks.
        sublayers: GCL sub-layers per block.
        cond_dim: width of ``cond["properties"]`` (0: unconditional model).
        attention: sigmoid attention gate on messages.
        tanh: bound coordinate updates by ``tanh``; each block's range is ``coords_range / layers``
            (as in EDM) so the total displacement per edge stays within ``coords_range``.
        coords_range: see ``tanh``.
        norm_constant: ``c`` in ``(x_i - x_j) / (||x_i - x_j|| + c)``.
        radius: if given, only atoms closer than this (at the input positions) exchange messages.
        normalization_factor: divisor of the summed messages (keyword only).
        position_output: ``"displacement"`` (``x_out - x_in``, for eps-prediction) or ``"coordinates"`` (``x_out``
            itself, for x0-prediction); both with each molecule's mean removed (keyword only).
        self_conditioning: accept ``self_cond`` (a previous ``[positions | features]`` estimate, Chen et al. 2022):
            its features join the node input and its squared distances the edge attributes (keyword only).

    Shapes:
        - x: :math:`(N, 3 + F)`; c_noise: :math:`(B,)`; cond["properties"]: :math:`(B, C)`;
          cond["uncond"]: :math:`(B,)` bool; batch: :math:`(N,)`
        - output: :math:`(N, 3 + F)`
    """

    def __init__(
        self,
        num_features: int,
        hidden: int = 128,
        layers: int = 6,
        sublayers: int = 2,
        cond_dim: int = 0,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        radius: float | None = None,
        *,
        normalization_factor: float = 1.0,
        position_output: str = "displacement",
        self_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if position_output not in ("displacement", "coordinates"):
            raise ValueError(f"position_output: expected 'displacement' or 'coordinates', got {position_output!r}")
        self.num_features = num_features
        self.hidden = hidden
        self.cond_dim = cond_dim
        self.radius = radius
        self.position_output = position_output
        self.supports_self_conditioning = self_conditioning
        self.noise_embedding = NoiseLevelEmbedding()
        in_dim = num_features * (2 if self_conditioning else 1) + self.noise_embedding.out_dim
        in_dim += cond_dim + 1 if cond_dim > 0 else 0
        self.embedding = nn.Linear(in_dim, hidden)
        layer_range = coords_range / layers if tanh else coords_range
        edge_dim = 3 if self_conditioning else 2
        self.blocks = nn.ModuleList(
            EquivariantBlock(hidden, sublayers, attention, tanh, layer_range, norm_constant, normalization_factor,
                             edge_dim=edge_dim)
            for _ in range(layers)
        )
        self.embedding_out = nn.Linear(hidden, num_features)
        self._edge_cache = _EdgeCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reinitialise every learnable parameter."""
        self.embedding.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.embedding_out.reset_parameters()

    def _condition(self, cond: dict[str, Tensor] | None, num_graphs: int, like: Tensor) -> Tensor:
        """Per-molecule conditioning channels ``[properties * (1 - u), u]`` with ``u`` the unconditional indicator."""
        props = None if cond is None else cond.get("properties")
        uncond = torch.ones(num_graphs, dtype=torch.bool, device=like.device)
        if props is None:
            props = like.new_zeros(num_graphs, self.cond_dim)
        else:
            if props.shape != (num_graphs, self.cond_dim):
                raise ValueError(f"cond['properties'] must have shape {(num_graphs, self.cond_dim)}, got {tuple(props.shape)}")
            props = props.to(like.dtype)
            flag = cond.get("uncond") if cond is not None else None
            uncond = flag.to(like.device, torch.bool).reshape(num_graphs) if flag is not None else ~uncond
        u = uncond.to(like.dtype).unsqueeze(-1)
        return torch.cat([props * (1.0 - u), u], dim=-1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: dict[str, Tensor] | None = None, *, batch: Tensor,
                self_cond: Tensor | None = None) -> Tensor:
        """Predict ``[position displacement (or coordinates) | features]`` for noisy molecules ``x``."""
        pos, feat = x[:, :3], x[:, 3:]
        if feat.size(1) != self.num_features:
            raise ValueError(f"expected {3 + self.num_features} input columns, got {x.size(1)}")
        c_noise = c_noise.reshape(-1).to(x.dtype)
        num_graphs = c_noise.numel()
        if num_graphs == 1 and batch.numel() > 0:
            num_graphs = int(batch.max()) + 1
            c_noise = c_noise.expand(num_graphs)
        per_graph = [self.noise_embedding(c_noise)]
        if self.cond_dim > 0:
            per_graph.append(self._condition(cond, num_graphs, x))
        elif cond is not None and cond.get("properties") is not None and cond["properties"].numel() > 0:
            raise ValueError("cond['properties'] given to a model built with cond_dim=0")
        nodes = [feat]
        if self.supports_self_conditioning:
            if self_cond is not None and self_cond.shape != x.shape:
                raise ValueError(f"self_cond must be shaped like x {tuple(x.shape)}, got {tuple(self_cond.shape)}")
            sc = self_cond.to(x.dtype) if self_cond is not None else torch.zeros_like(x)
            nodes.append(sc[:, 3:])
        elif self_cond is not None:
            raise ValueError("self_cond given to an EGNNDenoiser built with self_conditioning=False")
        h = self.embedding(torch.cat([*nodes, torch.cat(per_graph, dim=-1)[batch]], dim=-1))

        edge_index, _, radial0 = _edges(self._edge_cache, batch, pos, num_graphs, self.radius)
        if self.supports_self_conditioning:
            src, dst = edge_index
            sc_radial = (sc[dst, :3] - sc[src, :3]).pow(2).sum(-1, keepdim=True)
            radial0 = torch.cat([radial0, sc_radial], dim=-1)
        out_pos = pos
        for block in self.blocks:
            h, out_pos = block(h, out_pos, edge_index, radial0)
        moved = out_pos if self.position_output == "coordinates" else out_pos - pos
        return torch.cat([remove_mean(moved, batch, num_graphs), self.embedding_out(h)], dim=-1)


class MolEGNN(EGNNDenoiser):
    """EGNNDenoiser whose position output is re-gauged into the fragment frame when ``anchor`` is given.

    In the fragment frame the noise lives in {centroid of the anchor atoms = 0} (``FragmentFrame``), so the
    predicted noise is projected into that space too; without it the molecule's centre of mass relative to
    the fragment would be read as signal and amplified by 1/alpha over the trajectory. Same parameters.
    The molecules domain's backbone (``MoleculesDomain.build_backbone``).
    """

    def forward(self, x: Tensor, c_noise: Tensor, cond: dict[str, Tensor] | None = None, *, batch: Tensor,
                anchor: Tensor | None = None, self_cond: Tensor | None = None) -> Tensor:
        out = super().forward(x, c_noise, cond, batch=batch, self_cond=self_cond)
        if anchor is None:
            return out
        pos = FragmentFrame(batch, anchor, c_noise.numel()).project(out[:, :3])
        return torch.cat([pos, out[:, 3:]], dim=-1)


class EGNNPredictor(nn.Module):
    r"""Invariant EGNN graph regressor used as EDM's property predictor (Satorras et al. 2021, Sec. 5.3; Hoogeboom et al. 2022).

    As in Satorras et al.'s QM9 model, coordinates are not updated: each layer is a :class:`GCL` on the
    squared inter-atomic distances, followed by a node MLP, sum (or mean) pooling and a graph MLP.

    Args:
        num_features: number of invariant atom features ``F``.
        num_outputs: number of regression targets.
        hidden: node feature width.
        layers: number of GCL layers.
        attention: sigmoid attention gate on messages.
        pool: ``"sum"`` or ``"mean"``.
        radius: optional interaction cut-off.
        normalization_factor: divisor of the summed messages.

    Shapes:
        - x: :math:`(N, 3 + F)`; batch: :math:`(N,)`
        - output: :math:`(B, \text{num\_outputs})`
    """

    def __init__(
        self,
        num_features: int,
        num_outputs: int,
        hidden: int = 128,
        layers: int = 7,
        attention: bool = True,
        pool: str = "sum",
        radius: float | None = None,
        normalization_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if pool not in ("sum", "mean"):
            raise ValueError(f"pool must be 'sum' or 'mean', got {pool!r}")
        self.num_features = num_features
        self.num_outputs = num_outputs
        self.pool = pool
        self.radius = radius
        self.embedding = nn.Linear(num_features, hidden)
        self.gcls = nn.ModuleList(GCL(hidden, 1, attention, normalization_factor) for _ in range(layers))
        self.node_dec = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.graph_dec = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, num_outputs))
        self._edge_cache = _EdgeCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reinitialise every learnable parameter."""
        self.embedding.reset_parameters()
        for gcl in self.gcls:
            gcl.reset_parameters()
        for mlp in (self.node_dec, self.graph_dec):
            for m in mlp:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int | None = None) -> Tensor:
        """Predict graph-level properties from clean ``[positions | features]``."""
        pos, feat = x[:, :3], x[:, 3:]
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() > 0 else 0
        edge_index, _, radial = _edges(self._edge_cache, batch, pos, num_graphs, self.radius)
        h = self.embedding(feat)
        for gcl in self.gcls:
            h = gcl(h, edge_index, radial)
        h = self.node_dec(h)
        g = scatter(h, batch, dim=0, dim_size=num_graphs, reduce=self.pool)
        return self.graph_dec(g)
