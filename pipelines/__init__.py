"""SDXL pipelines around opdiff: load a base, read a dataset, train, sample, export; and the `opdiff` CLI.

    from pipelines.config import TrainConfig
    from pipelines.train import train
    from pipelines.sample import SampleConfig, sample, save_grid

    run_dir = train(TrainConfig(method="op-lora", data="my-images/"))   # run_dir/lora.safetensors
    comparison = sample(SampleConfig(str(run_dir)))                     # base | adapted, images and labels
    save_grid(comparison, run_dir / "samples.png")

The parts of a run: `config` (settings), `rundir` (its files and lock), `encoding`, `training_data`, `step`,
`checkpoint`, `interrupt` (stopping early), `train` (the loop), `export`, `sample`, `evaluate`.

Modules are imported one by one (nothing here) so `pipelines.config` stays light for the CLI and the GUI.
"""
