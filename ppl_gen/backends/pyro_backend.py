"""The Pyro backend: Pyro's ELBO as a loss, a torch optimizer over Pyro's parameter store."""

from __future__ import annotations


class PyroBackend:
    name, suffix = "pyro", ""

    def check(self, setup) -> None:
        pass

    def trainer(self, setup):
        from ppl_gen.core.train import Trainer, make_elbo

        cfg, spec, g = setup.cfg, setup.spec, setup.guide
        from ppl_gen.core.distributed import world_size

        elbo = make_elbo(cfg.elbo, jit=cfg.jit, num_particles=cfg.num_particles, alpha=cfg.renyi_alpha)
        # the guide's written-out ELBO where it is the run's estimator (one particle, no JIT; on one
        # process: the distributed step rescales Pyro's traced sites, which a written-out loss has not)
        fused = (g.loss if g.loss is not None and cfg.elbo == g.loss_elbo and cfg.num_particles == 1
                 and not cfg.jit and world_size() == 1 else None)
        return Trainer(spec.model, g.fn, setup.dataset.train, elbo, lr=cfg.lr, batch_size=cfg.batch_size,
                       seed=cfg.seed, validate=cfg.validate, local_params=g.local_params, local_lr=g.local_lr,
                       update=g.update, param_lr=spec.param_lr, buffers=spec.buffers, device=setup.device,
                       fused_loss=fused)

    def extra_config(self, setup) -> dict:
        return {}

    def sync(self, trainer) -> None:
        pass
