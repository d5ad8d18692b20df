"""The base of both optimizer families: parameters packed into :class:`subgrad.FlatParams` buffers, and
per-parameter state kept as views into flat state buffers."""

from __future__ import annotations

import torch

from ..flat import FlatGroup


class FlatOptimizer(torch.optim.Optimizer):
    """Base of both families (``SGD``/``AdamW`` and the zeroth-order ones): parameters packed into
    :class:`FlatParams` buffers (``self._flats``), repacked when the trainable parameters change, and
    per-parameter state kept as views into flat state buffers.  ``self.state[p][key]`` is always a view
    of parameter ``p``'s part of its group's buffer ``key``, so torch.optim's ``state_dict`` layout works
    as is and a repack carries every parameter's state over (:meth:`_adopt_state`)."""

    #: state entries that live in flat buffers (other entries, such as AdamW's step, are per parameter)
    _buffer_keys: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; the flat buffers, step counters
        # and settings must travel too, so deepcopy / pickle give a working optimizer.  Hooks do not
        # travel, as in torch (a lambda hook cannot be pickled); __setstate__ starts them empty.
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}

    def _trainable(self) -> tuple:
        """Which parameters of each group are trainable now; a change since packing means repack."""
        return tuple(tuple(id(p) for p in group["params"] if p.requires_grad) for group in self.param_groups)

    def _packing_key(self) -> tuple:
        """What a packing depends on, cheap to take at every step: the groups, and each parameter's storage
        address and ``requires_grad``.  While it is unchanged the packing holds without per-parameter
        checks (a parameter moved by ``module.to()`` or relinked by ``deepcopy`` has a new address)."""
        params = [p for group in self.param_groups for p in group["params"]]
        groups = tuple((id(group["params"]), len(group["params"])) for group in self.param_groups)
        return groups, [p.data_ptr() for p in params], [p.requires_grad for p in params]

    def _buffer_dtype(self, fg: FlatGroup) -> torch.dtype:
        """dtype of the flat state buffers: the parameters' (torch.optim), float32 for zeroth-order state."""
        return fg.data.dtype

    def _flat_buffer(self, fg: FlatGroup, bufs: dict, key: str, fill: float = 0.0) -> torch.Tensor:
        """The flat state buffer ``key`` of one packed group (``bufs``), made on first use."""
        if bufs.get(key) is None:
            bufs[key] = torch.full_like(fg.data, fill, dtype=self._buffer_dtype(fg))
        return bufs[key]

    def _adopt_state(self, packed) -> None:
        """After packing (or loading): copy each parameter's state tensors into the flat buffers of its
        ``(FlatGroup, buffers)`` pair in ``packed`` and point ``state[p]`` at views of them."""
        for fg, bufs in packed:
            for i, p in enumerate(fg.params):
                st = self.state.get(p)
                for key in self._buffer_keys if st else ():
                    if isinstance(st.get(key), torch.Tensor):
                        view = fg.view(self._flat_buffer(fg, bufs, key), i)
                        view.copy_(st[key])
                        st[key] = view

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for flat in self._flats:  # deepcopy clones each parameter's data: make them views again
            flat.relink()
