"""``python -m smolcluster.chat``: a Gradio chat page and an OpenAI-compatible API on an inference pipeline.

    python -m smolcluster.chat                                  # random-init gpt2-tiny, 2 local stages
    python -m smolcluster.chat checkpoint=RUN_DIR serve.port=8000
    python -m smolcluster.chat role=head checkpoint=RUN_DIR cluster=lan-example head_host=HOST
    python -m smolcluster.chat cluster=auto checkpoint=RUN_DIR     # the stages on the node agents
    python -m smolcluster.chat cluster=auto checkpoint=RUN_DIR replicas=2   # 2 pipelines on the agents, one API

The page is at ``http://HOST:PORT/``, the API under ``/v1`` (docs/inference.md).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from smolcluster.launch.cli import user_errors
from smolcluster.launch.supervisor import exit_without_teardown, sigterm_as_interrupt
from smolcluster.paths import CONFIG_DIR
from smolcluster.serving import settings  # noqa: F401  (registers the chat schema before hydra.main runs)
from smolcluster.telemetry.logging import setup_logging


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="chat")
@user_errors()  # a SmolclusterError: one line, exit 2
def main(cfg: DictConfig) -> None:
    sigterm_as_interrupt()  # the stages are stopped on SIGTERM as on Ctrl-C
    from smolcluster.node.coordinator import agent_stages
    from smolcluster.serving.config import serve
    from smolcluster.serving.settings import chat_settings

    try:
        s = chat_settings(cfg)  # the one read of Hydra's config: typed settings from here on
        t = s.pipeline.telemetry  # (logging.prometheus / run_dir: what smolcluster.top reads)
        setup_logging(role="head", algo="chat", level=cfg.logging.level, loki=cfg.logging.get("loki"),
                      run_id=t.get("run_id", ""), run_dir=t.get("run_dir"))
        with agent_stages(s.pipeline) as restarts:  # cluster=auto: the stages on the node agents, the head here
            serve(s, restarts)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a chat ends: exit 0


if __name__ == "__main__":
    main()  # errors exit inside (codes 2, 130; a traceback for a bug)
    exit_without_teardown()
