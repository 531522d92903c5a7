"""SDXL pipelines around opdiff: load a base, read a dataset, train, sample, export; and the `opdiff` CLI.

    from pipelines.config import TrainConfig
    from pipelines.train import train
    from pipelines.sample import sample

    run_dir = train(TrainConfig(method="op-lora", data="my-images/"))   # run_dir/lora.safetensors
    sample(run_dir)                                                     # run_dir/samples.png: base | adapted

Modules are imported one by one (nothing here) so `pipelines.config` stays light for the CLI and the GUI.
"""
