"""The block cut of a model that brings none: ActivityZO on the user's own network, traced with torch.fx.

:func:`block_cut` gives :class:`ActivityZO` its blocks: an explicit cut (a list of
:class:`~.activity_blocks.LocalBlock`), the model's own (:class:`~.activity_blocks.BlockCut`), or this
module's, from the traced graph:

1. **Trace** the model (``torch.fx.symbolic_trace``): one input, one output.  Refused: a forward that
   depends on the data (the trace fails), a parameter outside a ``Conv2d`` / ``Linear`` (a norm's scale and
   shift stay as they are: :func:`~.activity_blocks.untrained_parameters`).
2. **Cut points**: a node whose value is the only one the rest of the graph reads (every path from the
   input to the output passes through it).  In a chain (``nn.Sequential``, or a forward written as one) every
   node is one; a residual unit (torchvision's ``BasicBlock``, ``Bottleneck``, ``InvertedResidual``, or the
   user's own module of that shape) has none inside, so it stays whole.
3. **Blocks**: the pieces between cut points, grouped so that each holds its convolutions and linear layers
   (the *sites*) and what follows up to the next piece with a site: a conv with its norm, activation and
   pooling (LeNet's hand-written cut); a residual unit.  The last block ends at the model's output.

A block's clean pass keeps every node's value; site j's tail reevaluates the nodes that depend on it from a
perturbed activity for some rows, reading the rest from the clean pass.  In a tail BatchNorm normalises with
the clean batch's statistics, held fixed (each example's tail is its own), and dropout reuses the clean
pass's mask.  In-place modules (``nn.ReLU(inplace=True)``) run out of place, keeping the clean values.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .activity_blocks import BlockCut, BlockPass, LocalBlock, SiteRecord, batch_stats, local_blocks, through_batch_stats
from .graph_nodes import (
    ADDS,
    NORMS,
    PER_UNIT_FUNCTIONS,
    PER_UNIT_MODULES,
    SITE_LAYERS,
    check_trainable,
    getattr_path,
    is_flatten,
    is_global_average,
    is_per_unit,
    passing_range,
    pool_of,
)


def block_cut(model: nn.Module, cut: list[LocalBlock] | None = None) -> list[LocalBlock]:
    """The blocks ActivityZO trains ``model`` with: ``cut`` when given, the model's own
    (``local_blocks()``), else the cut traced from its graph (module docstring)."""
    if cut is not None:
        if not (isinstance(cut, (list, tuple)) and cut and all(isinstance(b, LocalBlock) for b in cut)):
            raise ValueError("cut must be a non-empty list of subgrad.optim.activity_blocks.LocalBlock")
        return list(cut)
    if isinstance(model, BlockCut):
        return local_blocks(model)
    return traced_blocks(model)


class _Graph:
    """The traced model: nodes in order, the module of each module node, and which nodes carry the batch."""

    def __init__(self, model: nn.Module):
        try:
            self.graph = fx.symbolic_trace(model).graph
        except Exception as exc:  # torch.fx raises several types; the reason is in the message
            raise ValueError(
                f"activity perturbation could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); give ActivityZO(model, cut=[...]) your blocks "
                "(subgrad.optim.activity_blocks.LocalBlock) or use zo-adam"
            ) from None
        self.model = model
        nodes = list(self.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(
                f"activity perturbation needs a model of one input; {type(model).__name__} takes {len(inputs)}"
            )
        self.input = inputs[0]
        (self.output,) = (n.args[0] for n in nodes if n.op == "output")
        if not isinstance(self.output, fx.Node):
            raise ValueError(f"{type(model).__name__} must return one tensor (the logits) for activity perturbation")
        self.modules = {n: model.get_submodule(n.target) for n in nodes if n.op == "call_module"}
        self.body = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
        batch = {self.input}
        for n in self.body:
            if any(a in batch for a in n.all_input_nodes):
                batch.add(n)
        self.batch = batch
        check_trainable(self.graph, model, self.modules)

    def is_site(self, n: fx.Node) -> bool:
        return isinstance(self.modules.get(n), SITE_LAYERS)

    def cut_points(self) -> list[int]:
        """Positions i in ``body`` after which only body[i]'s value is read later (the last one included)."""
        position = {n: i for i, n in enumerate(self.body)}
        position[self.input] = -1
        last_use = {n: max((position.get(u, len(self.body)) for u in n.users), default=-1) for n in position}
        cuts, reach = [], last_use[self.input]
        for i, n in enumerate(self.body):
            if reach <= i:
                cuts.append(i)
            reach = max(reach, last_use[n]) if n in self.batch else reach
        return cuts


def traced_blocks(model: nn.Module) -> list[LocalBlock]:
    """The cut of the traced graph (module docstring, steps 1-3)."""
    g = _Graph(model)
    pieces, start = [], 0
    for i in g.cut_points():
        pieces.append(g.body[start : i + 1])
        start = i + 1
    if start < len(g.body):
        pieces.append(g.body[start:])
    groups: list[list[fx.Node]] = []
    for piece in pieces:
        has_site = any(g.is_site(n) for n in piece)
        if has_site and any(g.is_site(n) for n in (groups[-1] if groups else [])):
            groups.append(list(piece))
        elif groups:
            groups[-1].extend(piece)
        else:
            groups.append(list(piece))
    if not any(g.is_site(n) for n in groups[-1]):
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer for activity perturbation to train")
    if g.body[-1] is not g.output:
        raise ValueError(f"{type(model).__name__}'s output must be its last computation (the logits)")
    blocks, block_input = [], g.input
    for k, nodes in enumerate(groups):
        blocks.append(GraphBlock(g, block_input, nodes, last=k == len(groups) - 1))
        block_input = nodes[-1]
    return blocks


class GraphBlock(LocalBlock):
    """A piece of the traced graph: ``nodes`` (in order) from ``block_input``'s value to the last node's."""

    def __init__(self, g: _Graph, block_input: fx.Node, nodes: list[fx.Node], last: bool):
        super().__init__()
        self._g, self.input, self.nodes, self.last = g, block_input, nodes, last
        self.layers = nn.ModuleList(g.modules[n] for n in nodes if n in g.modules)  # so .modules() finds them
        self.sites = [n for n in nodes if g.is_site(n)]
        self.num_sites = len(self.sites)
        # per site: the node it perturbs (the layer's output; or, after ReLU-like activation and a max-pool of
        # disjoint windows, the pooled output: a unit per window, perturbed without rerunning the pool, as the
        # hand-written cuts do), and the nodes of the block that value reaches, in order
        self.pooled = [self._pooled_site(site, set(nodes)) for site in self.sites]
        self.perturbed = [pooled[1] if pooled else site for site, pooled in zip(self.sites, self.pooled)]
        self._windows = {pool: pool_of(g.modules, pool)[1] for _, pool in filter(None, self.pooled)}
        self.downstream = []
        for start in self.perturbed:
            reached = {start}
            for n in nodes:
                if n is not start and any(a in reached for a in n.all_input_nodes):
                    reached.add(n)
            self.downstream.append([n for n in nodes if n in reached and n is not start])
        # what outlives the clean pass: the output, each site's activity and input, and what each tail reads
        # from the clean pass; and per tail, the step after which each value it makes is read no more
        self._reads = {nodes[-1], *self.perturbed, *(s.args[0] for s in self.sites if isinstance(s.args[0], fx.Node))}
        self._last_read = []
        for start, down in zip(self.perturbed, self.downstream):
            made = {start, *down}
            self._reads.update(a for n in down for a in n.all_input_nodes if a not in made)
            self._last_read.append({a: i for i, n in enumerate(down) for a in n.all_input_nodes if a in made})
        # a block that ends by flattening a map: its head reads the map (as LeNet's hand-written cut does)
        self.flattens = is_flatten(g.modules, nodes[-1]) and not last
        self.map_shape: tuple[int, ...] | None = None
        self.site_shapes: list[tuple[int, ...]] = []

    def _pooled_site(self, site: fx.Node, inside: set) -> tuple[fx.Node, fx.Node] | None:
        """(activation, pool) when ``site`` feeds only a ReLU-like activation that feeds only a max-pool of
        disjoint windows (a window's maximum, where the activation passes it, moves with its unit 1:1)."""
        g = self._g
        act = next(iter(site.users)) if len(site.users) == 1 else None
        if act is None or act not in inside or (passing_range(g.modules.get(act, act.target)) or (None,))[0] != 0:
            return None
        pool = next(iter(act.users)) if len(act.users) == 1 else None
        shape = pool_of(g.modules, pool) if pool is not None and pool in inside else None
        return (act, pool) if shape and shape[0] == "max" and shape[1] == shape[2] and not shape[3] else None

    # -- evaluation ----------------------------------------------------------------------------------
    def _eval(self, n: fx.Node, value, state: dict, rows: slice | None):
        """Node ``n`` on resolved arguments; ``state`` holds the clean pass's BatchNorm statistics and dropout
        masks (filled when ``rows`` is None, the clean pass; read in the tails)."""
        args = fx.node.map_arg(n.args, value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        if n in self._windows and rows is None:  # a pooled site's pool: its indices carry estimates back
            pooled, state[n] = F.max_pool2d(args[0], self._windows[n], return_indices=True)
            return pooled
        if n.op == "call_module":
            m = self._g.modules[n]
            if isinstance(m, NORMS) and m.training:
                x = args[0]
                if rows is None:
                    state[n] = batch_stats(x)
                    return m(x)  # the module: updates the running statistics, once per step
                mean, var = state[n]
                return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
            if isinstance(m, nn.Dropout) and m.training:
                return self._dropout(n, args[0], m.p, state, rows)
            if getattr(m, "inplace", False):
                m.inplace = False
                try:
                    return m(*args, **kwargs)
                finally:
                    m.inplace = True
            return m(*args, **kwargs)
        if n.op == "call_function":
            if n.target is F.dropout:
                p, training = kwargs.get("p", args[1] if len(args) > 1 else 0.5), kwargs.get("training", True)
                return self._dropout(n, args[0], p, state, rows) if training else args[0]
            if "inplace" in kwargs:
                kwargs = dict(kwargs, inplace=False)
            return n.target(*args, **kwargs)
        method = n.target[:-1] if n.target.endswith("_") and not n.target.endswith("__") else n.target
        return getattr(args[0], method)(*args[1:], **kwargs)

    @staticmethod
    def _dropout(n, x, p, state, rows):
        if rows is None:
            state[n] = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
            return x * state[n]
        return x * state[n][rows]

    def _value(self, env: dict):
        def value(a: fx.Node):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return getattr_path(self._g.model, a.target)
            raise AssertionError(f"{a} is read outside its block")  # the cut points rule this out

        return value

    def forward(self, h: torch.Tensor, env: dict | None = None, state: dict | None = None) -> torch.Tensor:
        """The block's output alone (``env``, ``state``: filled with every node's value, for :meth:`run`)."""
        env, state = ({} if env is None else env), ({} if state is None else state)
        env[self.input], value = h, self._value(env)
        for n in self.nodes:
            env[n] = self._eval(n, value, state, None)
        return env[self.nodes[-1]]

    def run(self, h: torch.Tensor) -> BlockPass:
        env, state = {}, {}
        out = self(h, env, state)
        sites = [self._site(env, state, j) for j in range(self.num_sites)]
        self.site_shapes = [tuple(s.z.shape[1:]) for s in sites]
        if self.flattens:
            self.map_shape = tuple(env[self.nodes[-1].args[0]].shape[1:])
        n_batch = h.shape[0]
        del h
        self._forget(env)

        def tail(j: int, zp: torch.Tensor, rows: slice) -> torch.Tensor:
            local, last_read, end = {self.perturbed[j]: zp}, self._last_read[j], self.nodes[-1]
            del zp  # the tail owns it: freed after its last read

            def sliced(a: fx.Node):
                if a in local:
                    return local[a]
                if a.op == "get_attr":
                    return getattr_path(self._g.model, a.target)
                clean = env[a]
                if a in self._g.batch and isinstance(clean, torch.Tensor) and clean.dim() and clean.shape[0] == n_batch:
                    local[a] = clean[rows]
                elif a in self._g.batch and not isinstance(clean, torch.Tensor):  # a shape read off the batch
                    local[a] = self._eval(a, sliced, state, rows)
                else:
                    local[a] = clean
                return local[a]

            for i, n in enumerate(self.downstream[j]):
                local[n] = self._eval(n, sliced, state, rows)
                for a in n.all_input_nodes:
                    if last_read.get(a) == i and a is not end:
                        local.pop(a, None)
            return local[end] if end in local else sliced(end)

        return BlockPass(out, sites, tail)

    def _forget(self, env: dict) -> None:
        """Drop the clean pass's values that neither a tail nor a site reads (a value that is not a tensor, a
        shape read off the batch, is evaluated again in a tail: what it reads is kept)."""
        keep, todo = set(self._reads), [a for a in self._reads if not isinstance(env.get(a), torch.Tensor)]
        while todo:
            for a in todo.pop().all_input_nodes:
                if a not in keep:
                    keep.add(a)
                    if not isinstance(env.get(a), torch.Tensor):
                        todo.append(a)
        for n in [n for n in env if n not in keep]:
            del env[n]

    # -- a site's record: what its units' perturbations can move -------------------------------------
    def _site(self, env: dict, state: dict, j: int) -> SiteRecord:
        site, g = self.sites[j], self._g
        layer, z = g.modules[site], env[site]
        if isinstance(layer, nn.Linear) and z.dim() != 2:
            raise ValueError(f"layer {site.target}: activity perturbation takes a Linear layer on (batch, features)")
        x = env.get(site.args[0]) if isinstance(site.args[0], fx.Node) else None
        if self.pooled[j]:
            act, pool = self.pooled[j]
            low, high = passing_range(g.modules.get(act, act.target))
            window, pooled, full, where = self._windows[pool], env[pool], env[act].shape[-2:], state[pool]
            active = (pooled > low) & (pooled < high) if high != float("inf") else pooled > low
            unpool = lambda grad: F.max_unpool2d(grad, where, window, output_size=full)  # noqa: E731
            return SiteRecord(layer, x, pooled, active, unpool)
        active, n, inside = None, site, set(self.nodes)
        while len(n.users) == 1 and (user := next(iter(n.users))) in inside:
            mask = self._passes(user, env)
            if mask is False:
                break
            if mask is not None:
                active = mask if active is None else active & mask
            if pool_of(g.modules, user) is not None:  # past a pool the units are other ones
                break
            n = user
        through = None
        only = next(iter(site.users)) if len(site.users) == 1 else None
        if only is not None and isinstance(g.modules.get(only), NORMS) and g.modules[only].training:
            through = through_batch_stats(g.modules[only], z, batch_stats(z))
        return SiteRecord(layer, x, z, active, through_stats=through)

    def _passes(self, user: fx.Node, env: dict):
        """Which units of ``user``'s input move its output (a bool mask; None: all of them), or False when
        ``user`` is not a per-unit operation (the walk stops there)."""
        g, x = self._g, env.get(user.args[0]) if user.args and isinstance(user.args[0], fx.Node) else None
        target = g.modules.get(user, user.target)
        if target in ADDS:
            return None  # a residual sum passes each unit of either side with derivative 1
        pool = pool_of(g.modules, user)
        if pool is not None and pool[0] == "max" and x is not None:  # only a window's maximum moves its output
            _, where = F.max_pool2d(x, *pool[1:], return_indices=True)
            flat = torch.zeros(x.shape[:2] + (x.shape[2] * x.shape[3],), dtype=torch.bool, device=x.device)
            return flat.scatter_(2, where.flatten(2), True).view(x.shape)
        if pool is not None:
            return None
        if x is None or not (isinstance(target, PER_UNIT_MODULES) or target in PER_UNIT_FUNCTIONS):
            return False
        low, high = passing_range(target) or (None, None)
        if low is None:  # derivative nonzero (almost) everywhere; a dropped unit's perturbation is just multiplied by 0
            return None
        return (x > low) & (x < high) if high != float("inf") else x > low

    def head_input(self, out: torch.Tensor):
        return None if self.last else out.view(out.shape[0], *self.map_shape) if self.flattens else out

    def site_parts(self, j: int, parts: torch.Tensor):
        """The head part each unit of site j moves, where its path to the block output is per-unit
        operations, residual sums, non-overlapping pooling and a final flatten; None (the block's whole
        loss) where the path mixes units, such as a further convolution."""
        n, g, pools = self.perturbed[j], self._g, []  # pools: a window's side, or 0 for a global average
        while n is not self.nodes[-1]:
            if len(n.users) != 1:
                return None
            user = next(iter(n.users))
            target, pool = g.modules.get(user, user.target), pool_of(g.modules, user)
            if pool is not None:
                kernel, stride, padding = pool[1:4]
                if kernel != stride or padding:
                    return None
                pools.append(kernel)
            elif is_global_average(g.modules, user):
                pools.append(0)
            elif not is_per_unit(target):
                if not (self.flattens and user is self.nodes[-1]):
                    return None
            n = user
        shape = self.site_shapes[j]
        if parts.dim() != len(shape) or parts.shape[0] != shape[0]:
            return None
        sides = [shape[1:]] if parts.dim() == 3 else []
        for side in pools[:-1] if sides else []:  # the map's size at each pool's input, walking outwards
            sides.append((1, 1) if side == 0 else (sides[-1][0] // side, sides[-1][1] // side))
        for side, size in reversed(list(zip(pools, sides))):  # back from the head's map to the site's
            if side == 0:  # every position of a channel moves its one averaged unit
                parts = parts.expand(-1, *size)
            else:  # a unit of a pooled map came from a side x side window; units a floor-mode pool drops
                parts = parts.repeat_interleave(side, -1).repeat_interleave(side, -2)  # move nothing
                parts = F.pad(parts, (0, size[1] - parts.shape[2], 0, size[0] - parts.shape[1]), mode="replicate")
        return parts.contiguous() if tuple(parts.shape) == shape else None
