"""The sampler names of ``--scheduler``: each one a diffusers scheduler class and the config values the name fixes.

Both sampling paths read this one table: the PyTorch pipeline builds the diffusers class
(``diffusers_scheduler``), the runtime pipeline its numpy twin of the same name
(``pocketfusion.runtimes.schedulers``). A name builds its scheduler from the model's own scheduler
config (betas, prediction type, timestep spacing, ...), as diffusers' ``SomeScheduler.from_config(config)``
does, plus the values the name stands for (``dpmpp-2m-karras``: ``use_karras_sigmas=True``).
Standard library only at module level: the CLI lists the names in its help without loading torch.
"""

from __future__ import annotations

from pocketfusion.errors import UserError

# name -> (diffusers class, values the name forces, values it assumes where the model's config has none)
NAMES: dict[str, tuple[str, dict, dict]] = {
    "ddim": ("DDIMScheduler", {}, {}),
    # PLMS as Stable Diffusion's configs run it; a PNDM config that asks for the Runge-Kutta warm-up keeps it
    "pndm": ("PNDMScheduler", {}, {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}, {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, {}),
    "lcm": ("LCMScheduler", {}, {}),
}
# diffusers class -> name (DPMSolverMultistepScheduler with use_karras_sigmas: dpmpp-2m-karras, see ``name_of``)
CLASS_NAMES: dict[str, str] = {
    "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-ancestral", "DPMSolverMultistepScheduler": "dpmpp-2m", "LCMScheduler": "lcm",
}


def check_name(name: str) -> str:
    """``name`` if it is a sampler name, else a one-line ``UserError`` listing them."""
    if name not in NAMES:
        raise UserError(f"unknown scheduler {name!r}; available: {', '.join(NAMES)}")
    return name


def name_of(config: dict) -> str:
    """The sampler name of a diffusers scheduler config (its ``_class_name``; DDIM when it has none).

    Raises:
        UserError: a class no name stands for.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    if cls not in CLASS_NAMES:
        raise UserError(f"no scheduler for {cls!r} (supported: {', '.join(CLASS_NAMES)}); "
                        f"pass --scheduler with one of: {', '.join(NAMES)}")
    name = CLASS_NAMES[cls]
    return "dpmpp-2m-karras" if name == "dpmpp-2m" and config.get("use_karras_sigmas") else name


def resolve(config: dict, name: str | None = None) -> tuple[str, str, dict]:
    """(name, diffusers class, config) of the scheduler ``name`` built from the model's scheduler ``config``
    (``name`` None: the config's own class, its values as they are).

    The returned config keeps the model's ``_class_name`` and the keys the class does not take (its
    ``from_config`` drops those of the original class quietly).

    Raises:
        UserError: an unknown name or a config class no name stands for.
    """
    values = dict(config)
    if name is None:
        name = name_of(config)
        return name, NAMES[name][0], values
    cls, forced, assumed = NAMES[check_name(name)]
    return name, cls, {**assumed, **values, **forced}


def diffusers_scheduler(config: dict, name: str | None = None):
    """The diffusers scheduler ``name`` built from a model's scheduler ``config`` (a dict or a diffusers ``FrozenDict``).

    Example:
        >>> sched = diffusers_scheduler(pipe.scheduler.config, "dpmpp-2m-karras")  # DPMSolverMultistepScheduler
    """
    import diffusers

    _, cls, values = resolve(config, name)
    return getattr(diffusers, cls).from_config(values)
