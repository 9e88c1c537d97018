"""``lpm calibrate SCENARIO --train START:END --test START:END``: fit the learnable parameters to real data."""

from __future__ import annotations

import datetime as dt
import shlex
from pathlib import Path

import typer

from lpm.cli.display import console
from lpm.cli.options import llm_timeout_option, parse_list, parse_pairs, revision_option, weights_option
from lpm.paths import check_new_folder
from lpm.sampling import DEFAULT_ESTIMATOR, choose_estimator
from lpm.server_kind import SERVER_KINDS


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_command(
        scenario: str = typer.Argument(..., help="covid, labor, or path/to/file.py:ClassName"),
        train: str = typer.Option(..., "--train", help="fitting window START:END (YYYY-MM-DD)"),
        test: str = typer.Option(
            None, "--test", help="held-out window START:END, beginning the day after --train ends"
        ),
        policy: str = typer.Option("heuristic", "--policy", help="heuristic or llm"),
        data: Path = typer.Option(
            None, "--data", help="your own real series, in the format of the shipped file (replaces it)"
        ),
        parameters: str = typer.Option(
            None, "--parameters", help="comma-separated learnable parameters (default: all)"
        ),
        agents: int = typer.Option(None, "--agents", "-n", help="agents (default: the whole city, ≈ 8.34 M)"),
        epochs: int = typer.Option(40, "--epochs", help="Adam steps per restart (one train-window run each)"),
        lr: float = typer.Option(0.05, "--lr", help="Adam learning rate (unconstrained parameters)"),
        restarts: int = typer.Option(3, "--restarts", help="fits from jittered starts (the band's spread)"),
        eval_seeds: int = typer.Option(2, "--eval-seeds", help="forecast runs per restart"),
        truncate: int = typer.Option(
            None,
            "--truncate",
            help="steps per backpropagated piece, the gradient's horizon (default: 56 days); a piece that "
            "--memory-gb cannot hold is recomputed segment by segment, not cut shorter",
        ),
        memory_gb: float = typer.Option(12.0, "--memory-gb", help="memory the autograd graph may take"),
        estimator: str = typer.Option(
            DEFAULT_ESTIMATOR,
            "--estimator",
            help="gradient estimator: auto (pruned for covid, expected for labor), pruned, households, expected, "
            "bernoulli or mean-field",
        ),
        settings: list[str] = typer.Option(
            [], "--set", metavar="NAME=VALUE", help="a scenario setting (the starting value of a fit)"
        ),
        start_from: str = typer.Option(
            "defaults",
            "--from",
            help="starting values: defaults (the scenario's, calibrated where it has a calibration) or "
            "literature (the cited values, ignoring its calibration)",
        ),
        prior: float = typer.Option(
            0.0,
            "--prior",
            help="weight of a penalty keeping the parameters near their starting values (squared distance "
            "in the unconstrained space, mean over parameters); 0: none",
        ),
        seed: int = typer.Option(0, "--seed", help="seed of the population and of the runs"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        also_from: str = typer.Option(
            None,
            "--also-from",
            help="later start dates inside --train (comma-separated): each epoch also runs from each to the "
            "window's end, seeded from the data before it, and the loss is the mean over the runs",
        ),
        llm_url: str = typer.Option(
            None,
            "--llm-url",
            help="OpenAI-compatible base URL, or replicas of one model, comma-separated (default: local)",
        ),
        llm_model: str = typer.Option(None, "--llm-model", help="served model name"),
        weights: Path = weights_option(),
        revision: str = revision_option(),
        server: str = typer.Option("vllm", "--server", help=f"kind of LLM server: {', '.join(SERVER_KINDS)}"),
        cache: str = typer.Option("use", "--cache", help="response cache: use, refresh, off or replay"),
        llm_timeout: float = llm_timeout_option(),
        out: Path = typer.Option(
            None, "--out", "-o", help="folder (default runs/calibrate-<scenario>-<time>)"
        ),
    ) -> None:
        """Fit a scenario's learnable parameters (and an LLM policy's alignment offsets) to the real series by
        gradient descent, and forecast the held-out window: calibration.json, loss.png, fit.png."""
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        from lpm.calibration import Window, calibrate, write
        from lpm.errors import CacheMissError, InputError
        from lpm.population import Population
        from lpm.progress import progress_bar
        from lpm.run import RunConfig, _policy, check_device
        from lpm.scenarios import make_scenario

        train_w = Window.parse(train, "--train")
        test_w = Window.parse(test, "--test") if test else None
        values = parse_pairs(settings, "--set", "beta=0.05")
        if data is not None:
            if not data.is_file():
                raise InputError(f"--data {data}: no such file")
            values["data"] = str(data)
        if start_from not in ("defaults", "literature"):
            raise InputError(f"--from must be defaults or literature, got {start_from!r}")
        if policy not in ("heuristic", "llm"):
            raise InputError(f"--policy must be heuristic or llm, got {policy!r}")
        config = RunConfig.build(
            scenario=scenario,
            policy=policy,
            agents=agents,
            seed=seed,
            start=train_w.first.date(),
            scenario_config=values,
            llm_url=llm_url,
            llm_model=llm_model,
            llm_weights=None if weights is None else str(weights),
            llm_revision=revision,
            server=server,
            cache=cache,
            llm_timeout=llm_timeout,
            device=device,
        )
        check_device(device, "--device")
        base = make_scenario(
            scenario, {**values, "start": train_w.first.date()}, calibrated=start_from == "defaults"
        )
        if data is not None and "data" not in type(base).Config.model_fields:
            raise InputError(f"--data: the {base.name} scenario reads no data file of yours")
        names = parse_list(parameters, "--parameters") or None
        later = []
        for text in parse_list(also_from, "--also-from") or []:
            try:
                later.append(dt.date.fromisoformat(text))
            except ValueError:
                raise InputError(f"--also-from must be dates YYYY-MM-DD, got {text!r}") from None
        folder = out or Path("runs") / f"calibrate-{base.name}-{policy}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        check_new_folder(folder)
        pop = Population.synthesize("nyc", agents=agents, seed=seed, device=device)
        argv = ["lpm", "calibrate", scenario, "--train", train] + (["--test", test] if test else [])
        argv += ["--policy", policy, "--agents", str(len(pop)), "--epochs", str(epochs), "--lr", str(lr)]
        argv += ["--restarts", str(restarts), "--eval-seeds", str(eval_seeds), "--seed", str(seed)]
        argv += [
            "--estimator",
            choose_estimator(estimator, base.pruned) if estimator == "auto" else estimator,
        ]
        argv += ["--parameters", parameters] if parameters else []
        argv += ["--from", start_from] if start_from != "defaults" else []
        argv += ["--truncate", str(truncate)] if truncate else []
        argv += ["--also-from", also_from] if later else []
        argv += ["--prior", str(prior)] if prior else []
        argv += ["--device", device] if device != "cpu" else []  # a GPU draws another population
        argv += [x for s in settings for x in ("--set", s)] + (["--data", str(data)] if data else [])
        if policy == "llm":  # which model answered (the URL without credentials)
            from lpm.endpoint import redact_url

            for flag, value in (
                ("--llm-url", redact_url(llm_url)),
                ("--llm-model", llm_model),
                ("--model", weights),
                ("--model-revision", revision),
                ("--server", server if server != "vllm" else None),
            ):
                argv += [flag, str(value)] if value else []

        def make(overrides):
            return make_scenario(scenario, {**values, **dict(overrides)}, calibrated=start_from == "defaults")

        bar = progress_bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
        )
        with _policy(
            config, lambda s: console.print(f"starting the local model server (logs: {s.log_path}) ...")
        ) as (
            chosen,
            _info,
        ):
            with bar:
                tasks: dict[str, int] = {}

                def progress(phase: str, done: int, total: int, loss: float | None) -> None:
                    if phase not in tasks:
                        label = f"{base.name} · {policy} · {len(pop):,} agents · {phase}"
                        tasks[phase] = bar.add_task(label, total=total, loss="")
                    fields = {} if loss is None else {"loss": f"{loss:.4f}"}
                    bar.update(tasks[phase], completed=done, **fields)

                try:
                    cal = calibrate(
                        make,
                        pop,
                        chosen,
                        train=train_w,
                        test=test_w,
                        parameters=names,
                        epochs=epochs,
                        lr=lr,
                        restarts=restarts,
                        seed=seed,
                        eval_seeds=eval_seeds,
                        truncate=truncate,
                        memory_gb=memory_gb,
                        estimator=estimator,
                        also_from=later,
                        prior=prior,
                        progress=progress,
                        device=device,
                    )
                except CacheMissError as exc:
                    raise InputError(
                        f"--cache replay: policy {policy} needs decisions the cache does not hold: {exc}",
                        hint="calibrate once with --cache use (and a model server) to fill the cache",
                    ) from None
        if not truncate:  # the piece the defaults chose, so that the command reproduces under other defaults
            argv += ["--truncate", str(cal.settings["truncate_steps"])]
        cal.command = shlex.join(argv)
        files = write(cal, folder)
        console.print(
            f"[bold]{cal.scenario}[/] {cal.quantity} · {cal.agents:,} agents · {cal.wall_seconds:.0f} s"
        )
        for name, value in cal.parameters.items():
            console.print(f"  {name:<20} {cal.initial[name]:>10.4g} -> {value:.4g}")
        labelled = [(f"{w} {getattr(cal, w)}", cal.errors.get(w)) for w in ("train", "test")]
        labelled += [
            (f"  from {first}, {w}", e.get(w)) for first, e in cal.also.items() for w in ("train", "test")
        ]
        for label, e in labelled:
            if e:
                console.print(
                    f"{label}: MAPE {e['mape']}% (before: {e['before']['mape']}%), "
                    f"RMSE {e['rmse']:,} (before: {e['before']['rmse']:,}) over {e['periods']} periods"
                )
        console.print(
            f"model calls: {cal.counters.get('llm_queries', 0)}, cache hits {cal.counters.get('cache_hits', 0)}"
        )
        console.print(f"wrote {', '.join(files)} to {folder}")
