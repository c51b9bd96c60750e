"""CPU tests of gmagen.autotune: spaces and pruning against fake device limits,
the cache (keys, files, locking, lookup order), modes, and the search run on a
fake runner with a fake clock."""
