"""The memory plan of a training run, made before any weight is loaded, and the hint when memory runs out anyway.

    plan = plan_memory(model_args, training_args, task="abstract", max_length=32768, num_labels=0, token=token)
    model = task.load_model(..., long_context=plan.long_context)   # the techniques to install
    with plan.oom_hint():
        trainer.train()                                            # an OOM names the planner and what fits

The planner (``hfplug.memory``) reads ``config.json`` alone. On a GPU it sizes the step:
``--long_context auto`` turns on the cheapest techniques that make ``max_length`` fit, and
a length that cannot fit even with every technique is an error naming the longest that
does. Without a GPU there is nothing to size: techniques named explicitly (or ``all``)
are installed (they work, and are tested, on CPU), and ``auto`` turns none on.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from dataclasses import dataclass, field

from hfplug.fit import memory_plan_message
from hfplug.host_memory import HOST_PROCESS_RESERVE, host_budget
from hfplug.loading import adapter_base_model, load_config
from hfplug.long_context import AUTO, parse_long_context
from hfplug.long_context.apply import LongContextPlan, resolve_techniques
from hfplug.memory import applicable_techniques, estimate_memory
from hfplug.memory_search import choose_techniques, suggest_settings
from hfplug.sizes import GiB
from hfplug.training.model_setup import device_type_for, optim_name

logger = logging.getLogger(__name__)


class DoesNotFitError(ValueError):
    """The run's settings do not fit the GPU (planned before loading, or an OOM during training)."""


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` decided, and what it needs to explain an out-of-memory error."""

    long_context: LongContextPlan
    planner_command: str = ""
    config: object = None
    settings: dict = field(default_factory=dict)
    gpu_mem: int = 0

    @contextlib.contextmanager
    def oom_hint(self):
        """Turn a CUDA out-of-memory error into one paragraph: the planner command and settings that fit."""
        import torch

        try:
            yield
        except torch.OutOfMemoryError as err:
            fits = suggest_settings(self.config, gpu_mem=self.gpu_mem, **self.settings) if self.config else []
            raise DoesNotFitError(
                "the GPU ran out of memory during training (checkpoints already in output_dir are kept, and "
                "rerunning the command resumes from the last one). "
                + (f"Settings the memory planner expects to fit: {'; '.join(fits)}. " if fits else "")
                + f"The whole plan: {self.planner_command or 'python -m hfplug.fit --help'}"
            ) from err


def planner_command(model_name: str, settings: dict) -> str:
    """The ``python -m hfplug.fit`` line that shows this run's plan."""
    return " ".join(
        [
            "python -m hfplug.fit",
            f"--model_name_or_path {shlex.quote(model_name)}",
            f"--task {settings['task']} --quant {settings['quant']}",
            f"--max_length {settings['max_length']} --per_device_train_batch_size {settings['batch_size']}",
            f"--long_context {','.join(settings.get('long_context', ())) or 'off'}",
        ]
    )


def _host_ram_hint(config, gpu_mem: int, settings: dict) -> str:
    """What host RAM would make the run fit through offload_activations, when any amount would."""
    if "offload_activations" not in settings["long_context"]:
        return ""
    unlimited = estimate_memory(config, **dict(settings, max_host_memory=None))
    if unlimited.total > gpu_mem:
        return ""  # not even every layer input in host memory is enough
    need = unlimited.host_offloaded
    return (
        f", or give offload_activations {need / GiB:.1f} GiB of host RAM (--max_host_memory {need / GiB:.1f}GiB; "
        f"the machine needs about {(need + HOST_PROCESS_RESERVE) / GiB:.0f} GiB in all)"
    )


def plan_memory(model_args, training_args, *, task: str, max_length: int, num_labels: int, token=None) -> MemoryPlan:
    """Choose the ``--long_context`` techniques and check the run fits, before loading (see the module doc)."""
    requested = parse_long_context(model_args.long_context)
    on_gpu = device_type_for(training_args) == "cuda" and training_args.do_train
    tokens = training_args.per_device_train_batch_size * max_length
    budget = host_budget(model_args.max_host_memory)
    if not requested and not on_gpu:
        return MemoryPlan(LongContextPlan((), tokens, budget))  # nothing to plan: config.json is not even read
    base = adapter_base_model(model_args.model_name_or_path) or model_args.model_name_or_path
    config = load_config(base, token=token, trust_remote_code=model_args.trust_remote_code)
    settings = dict(
        quant=model_args.quant,
        lora_r=model_args.lora_r if model_args.lora else 0,
        task=task,
        max_length=max_length,
        batch_size=training_args.per_device_train_batch_size,
        activation_checkpointing=bool(training_args.activation_checkpointing),
        optim=optim_name(training_args),
        num_labels=num_labels,
        lora_dropout=model_args.lora_dropout,
        max_host_memory=budget,
    )
    applicable = applicable_techniques(config, **settings)
    if not on_gpu:
        if requested == AUTO:
            logger.info("--long_context auto: no GPU training to plan for, so no technique is turned on.")
        techniques = resolve_techniques(model_args.long_context, applicable=applicable)
        return MemoryPlan(LongContextPlan(techniques, tokens, budget))

    import torch

    gpu_mem = torch.cuda.get_device_properties(training_args.device).total_memory
    choice = choose_techniques(config, gpu_mem=gpu_mem, host_mem=budget, **settings)
    if not choice.fits and choice.longest_with_all < max_length:
        raise DoesNotFitError(
            f"--max_length {max_length} does not fit this GPU ({gpu_mem / GiB:.1f} GiB) even with every "
            f"--long_context technique ({', '.join(applicable)}) and {budget / GiB:.1f} GiB of host RAM for "
            f"offloading: the memory planner's longest is {choice.longest_with_all} tokens at batch size "
            f"{settings['batch_size']}. Use --max_length {choice.longest_with_all} or less"
            + _host_ram_hint(config, gpu_mem, dict(settings, long_context=applicable))
            + f" (plan: {planner_command(base, dict(settings, long_context=applicable))})."
        )
    techniques = resolve_techniques(model_args.long_context, applicable=applicable, auto=tuple(choice))
    if requested == AUTO:
        logger.info("--long_context auto: %s", ", ".join(techniques) or "nothing needed at this length")
    settings["long_context"] = techniques
    fits, message = memory_plan_message(config, gpu_mem=gpu_mem, model_name=base, **settings)
    logger.log(logging.INFO if fits else logging.WARNING, message)
    return MemoryPlan(
        LongContextPlan(techniques, tokens, budget),
        planner_command=planner_command(base, settings),
        config=config,
        settings=settings,
        gpu_mem=gpu_mem,
    )
