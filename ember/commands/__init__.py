"""The verbs of the ``ember`` command, one module each; :mod:`ember.cli` registers them and dispatches.

Each module has ``add_parser(subparsers)`` and the verb's ``cmd_*`` function (``args.func``).
:mod:`ember.commands.common` holds what they share: the MODEL argument (paths or local names),
sampling options and :func:`~ember.commands.common.load_from_args`, the one way a verb loads a model.
``plan``/``hw``, ``tune``/``merge`` and ``quantize`` keep their parsers beside their code
(:mod:`ember.plan_cli`, :mod:`ember.train.cli`, :mod:`ember.quant.cli`).
"""
