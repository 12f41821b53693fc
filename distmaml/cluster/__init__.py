"""The cluster a run meets: joining it (``connect``), whether an address answers (``reach``), where the
workers go (``placement``: the placement group, the node types a cluster file can add, ``capacity``:
what one node holds, ``autoscaler``: what it is launching while a run waits). Below the engines, above data,
models and core; ``distmaml.oncluster`` (a command run on the head by ``ray submit`` or a Ray job) is an entry point."""
