"""The pruning engine, one step per file:

    trace.py     torch.fx tracing (chunk/split unpacking, untraceable submodules as leaves) and
                 each node's shape: by rule for the usual CNN ops, else by a forward
    rules.py     what each op does to channels: one rule per op; register_module for yours
    channels.py  the analysis' data: slots, a tensor's channel layout, module uses
    slots.py     the slot walk: one slot per channel, tied by union-find, one step per rule
    layout.py    the walk's steps for ops that move channels (cat, split, views, shuffles)
    classes.py   gates, and how each BatchNorm relates to its input (owned / tied / gather)
    analysis.py  analyze(): trace -> slots -> classes -> prunable units, errors naming the op
    plan.py      global threshold, group scores, guards: {bn: kept channels}
    slim.py      apply_plan: the physically smaller model, one slicer per module kind
    blocks.py    whole residual branches removed when all their factors are under the threshold
    mask.py      apply_mask: the same shape, pruned factors held at zero
    compensate.py  fold what removed channels still output into their readers
    probe.py     the constants compensate folds: the traced graph run on the removed channels only
    counts.py    the report's MACs read off the traced graph (profile.count's rules), no forward
    copying.py   clone_model: copy.deepcopy of a model, module by module (the engine's copies)
    prune.py     prune(): the steps above, budgets, the report

The modules slim models run (IndexedBatchNorm*) are in netslim/layers.py.
"""
