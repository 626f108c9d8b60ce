"""The training engine: what train.py runs and the bench times, each part defined once.

- `config`: Config (a field per train.py flag), RECIPES, SMOKE, resolve, check, resumed;
- `device`: Env and setup_env (device, bf16 autocast, layout, DDP, threads), compile_checked;
- `convs`: choose_convs, what runs each depthwise conv (`--conv-impl`), checked and timed at start;
- `loop`: the optimizer, the Schedule, train_step, train_epoch, evaluate;
- `run`: the run's data, RunState (where it is), save_run and restore_run, the run-folder lock,
  the data check on resume, run_facts, ROOT;
- `checkpoint`: atomic writes, checkpoints read with weights_only, a run's weights read back;
- `stop`: StopSignal (Ctrl-C, SIGTERM) and SaveClock (when to save inside an epoch);
- `log`: the console / TensorBoard logger (train.py's; the bench passes none);
- `results`: finished runs grouped by settings or by sweep variant, mean ± std over seeds;
- `errors`, `cli`: UserError and SaveError, and every entry point's one-line `error: ...`.

It stands on `net` and `pipelines` and imports neither entry point.
"""
