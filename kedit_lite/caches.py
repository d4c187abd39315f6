"""One kind of in-process cache for the whole library, and `clear_caches()` to empty them all.

Loading a checkpoint, estimating E[kkᵀ] or embedding IKE's pool costs seconds; each is kept here once per
process. An entry tied to a model (or a tensor) is keyed by that object through a weak reference, so it goes
when the object does (never by `id()`, which Python reuses after garbage collection). Files on disk (the
statistics in the kedit cache directory) are not touched by `clear_caches()`.
"""
import weakref

_ALL = []


class Cache:
    """A named store: `get(key, make, owner=None)` returns the stored value or stores make()'s."""

    def __init__(self, name, maxsize=None):
        self.name, self.maxsize = name, maxsize
        self._shared, self._owned = {}, weakref.WeakKeyDictionary()
        _ALL.append(self)

    def _store(self, owner):
        return self._shared if owner is None else self._owned.setdefault(owner, {})

    def get(self, key, make, owner=None):
        """The value for (owner, key), computed by make() the first time (oldest entry dropped past maxsize)."""
        store = self._store(owner)
        if key not in store:
            value = make()
            if self.maxsize is not None and len(store) >= self.maxsize:
                store.pop(next(iter(store)))
            store[key] = value
        return store[key]

    def peek(self, key, owner=None, default=None):
        """The stored value, or `default` without computing anything."""
        if owner is not None and owner not in self._owned:
            return default
        return self._store(owner).get(key, default)

    def put(self, key, value, owner=None):
        self._store(owner)[key] = value
        return value

    def forget(self, owner=None):
        """Drop the entries of one owner (or the shared ones)."""
        if owner is None:
            self._shared.clear()
        else:
            self._owned.pop(owner, None)

    def clear(self):
        self._shared.clear()
        self._owned.clear()

    def __len__(self):
        return len(self._shared) + sum(len(v) for v in self._owned.values())


def clear_caches():
    """Empty every in-process cache of kedit_lite (checkpoints, statistics, pools, prefixes); files stay."""
    for cache in _ALL:
        cache.clear()


def all_caches():
    """{name: number of entries} of every cache, for a quick look at what the process holds."""
    return {cache.name: len(cache) for cache in _ALL}
