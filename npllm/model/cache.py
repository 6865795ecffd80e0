"""The key/value cache of lecture 002: what a decoding step remembers of the tokens before it.

A decoder recomputes nothing it has seen: the keys and values of every layer for the tokens so
far are kept, and one more token costs one row of attention per layer instead of a pass over
the whole prefix (the forward pass calls :meth:`KVCache.update` in each layer).
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVCache:
    r"""The key/value cache of lecture 002: every layer's K and V for the tokens seen so far.

    ``keys[l]`` and ``values[l]`` are ``[B, K, capacity, Dh]``; the first ``length`` positions are
    filled. Decoding one more token then costs one row of attention per layer instead of
    recomputing the whole prefix. Storage grows by doubling, so a decode loop does not allocate
    at every step.
    """
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, config, batch_size=1, capacity=256):
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        return cls._zeros(config.num_hidden_layers, shape)

    @property
    def capacity(self):
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, n_new):
        """Make room for ``n_new`` more positions (double the storage when it is full)."""
        needed = self.length + n_new
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                grown = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], np.float32)
                grown[:, :, :self.length] = old[:, :, :self.length]
                store[layer] = grown

    def update(self, layer, k, v):
        """Write the new positions' k, v [B, K, T, Dh] of ``layer``; return all keys and values
        so far, [B, K, length + T, Dh] (views, no copy)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def prefix(self, n, capacity):
        """A new cache holding a copy of the first ``n`` positions of this one, with room for
        ``capacity`` in all: a conversation's next turn starts from the turns before it. This
        cache is left as it is."""
        if not 0 <= n <= min(self.length, capacity):
            raise ValueError(f"a prefix of {n} positions of a cache holding {self.length} "
                             f"does not fit in a capacity of {capacity}")
        B, K, _, Dh = self.keys[0].shape
        copy = KVCache._zeros(len(self.keys), (B, K, capacity, Dh))
        for mine, its in ((self.keys, copy.keys), (self.values, copy.values)):
            for old, new in zip(mine, its):
                new[:, :, :n] = old[:, :, :n]
        copy.length = n
        return copy

    @classmethod
    def _zeros(cls, layers, shape):
        return cls([np.zeros(shape, np.float32) for _ in range(layers)],
                   [np.zeros(shape, np.float32) for _ in range(layers)], 0)

    def __repr__(self):
        if not self.keys:
            return "KVCache(empty)"
        B, K, _, Dh = self.keys[0].shape
        return (f"KVCache(layers={len(self.keys)}, batch={B}, kv_heads={K}, head_dim={Dh}, "
                f"length={self.length}, capacity={self.capacity})")
