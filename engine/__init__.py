"""The training engine: what train.py runs and the bench times, each part defined once.

- `config`: Config (a field per train.py flag), RECIPES, SMOKE, resolve, check, UserError;
- `device`: Env and setup_env (device, bf16 autocast, DDP, threads), compile_checked;
- `loop`: the optimizer, the Schedule, train_step, train_epoch, evaluate;
- `run`: atomic writes, checkpoints read with weights_only, RunState, the run-folder lock, the
  data check on resume, StopSignal and SaveClock (when to stop or save), run_facts;
- `log`: the console / TensorBoard logger (train.py's; the bench passes none);
- `results`: finished runs grouped by settings, mean ± std over seeds (results.py, the bench).

It stands on `net` and `pipelines` and imports neither entry point.
"""
