"""pocketfusion.compress.distill — step distillation: ``distill(model, DistillConfig, out)`` trains a student
U-Net that samples in 1, 2 or 4 steps with the guidance scale as an input (one batch-1 call per step, no CFG
pair), through ``pocketfusion.training``, and writes a diffusers folder with diffusers' ``LCMScheduler``.

* ``config``  — ``DistillConfig``;
* ``student`` — the student U-Net (``time_cond_proj_dim``), the guidance embedding, the noise schedule;
* ``teacher`` — prompts, their embeddings, and the teacher's guided samples (cached for ``resume``);
* ``methods`` — the objectives: ``lcm`` (latent consistency distillation) and ``regression``;
* ``stage``   — ``distill`` and ``summary``.

Nothing here imports torch at import time.
"""

from pocketfusion.compress.distill.config import METHODS, STEPS, DistillConfig
from pocketfusion.compress.distill.stage import distill, lcm_scheduler_config, summary, work_dir

__all__ = ["METHODS", "STEPS", "DistillConfig", "distill", "lcm_scheduler_config", "summary", "work_dir"]
