"""The application: ``subgrad train`` and ``subgrad run`` on CIFAR-10, built on the library
(:mod:`subgrad.optim`, :mod:`subgrad.models`, :mod:`subgrad.capture`, :mod:`subgrad.kernels`).

==============  ==========================================================================
module          what
==============  ==========================================================================
config          every training setting, its defaults and its command-line flag (TrainConfig)
data            CIFAR-10 in any layout, the device-resident loader (crops and flips on the device)
session         a run's setup (device, data, model, optimizer), evaluation, checkpoints, resume
step            one training step with every input on the device (what --cuda-graph captures)
loop            train(): the loop, evaluation on schedule, Ctrl-C, the run folder's files
distributed     torchrun: byte-counted collectives, restart detection, the failure drill
runs            atomic writes, checkpoint files
pipeline        subgrad run: train, export, validate, bench, report
==============  ==========================================================================

The old flat names (``subgrad.train``, ``subgrad.config``, ``subgrad.data``, ``subgrad.distributed``,
``subgrad.runs``, ``subgrad.pipeline``) are these modules under another name.
"""
