"""The measuring core that `profile` and the benchmarks share: a measured child process, /proc and
page-cache readings, memory cgroups, device profiles and the statistics of repeated runs."""
