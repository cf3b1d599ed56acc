"""The training loop: set-up (determinism, data, model, optimiser, DistributedDataParallel,
compile), epochs of optimizer steps over accumulated micro-batches, per-epoch validation, and
the test of the best epoch's model at the end. Checkpoints go through ``Checkpointer``, epoch
records through ``MetricsLog``."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import Compose
from tqdm.auto import tqdm

from densenet.data.datasets import ShardedBatchSampler, TransformedDataset, collate, shard_indices
from densenet.data.files import write_json
from densenet.data.transforms import train_transform
from densenet.data.volumes import VolumeAugment
from densenet.infer.runtime import amp_dtype, process_group
from densenet.nn.registry import get_model
from densenet.tasks.accuracy import EvalResult, ModuleProbabilities, evaluate
from densenet.tasks.multilabel import label_metrics, pos_weight, predict_labels
from densenet.train.checkpointer import Checkpointer
from densenet.train.config import TrainConfig, check_config, config_dict, lr_factor
from densenet.train.metrics import MetricsLog
from densenet.train.setup import (
    TrainingError,
    check_sample,
    first_sample,
    load_data,
    make_optimizer,
    model_args,
    model_card,
    resolve,
    seed_and_determinism,
)
from densenet.weights.checkpoint import TrainCheckpoint, read_checkpoint

log = logging.getLogger(__name__)


class Trainer:
    """One training run: set-up, resume, epochs, validation, checkpoints."""

    def __init__(
        self, config: TrainConfig, resume: bool, rank: int, world_size: int, device: torch.device
    ) -> None:
        check_config(config)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.main, self.ddp = rank == 0, world_size > 1
        seed_and_determinism(config, device)
        self.splits = load_data(config)
        first = first_sample(self.splits)
        self.config = config = resolve(config, self.splits, first, device)
        check_sample(config, self.splits, first)
        self.out = Path(config.out)  # type: ignore[arg-type]
        self.checkpointer = Checkpointer(self.out, self.main, self.ddp, world_size, rank)
        if self.checkpointer.last_path.exists() and not resume:
            raise TrainingError(
                f"{self.out} already holds a run ({self.checkpointer.last_path}); continue it "
                "with --resume or choose another --out"
            )
        if resume and not self.checkpointer.last_path.exists():
            raise TrainingError(f"nothing to resume: {self.checkpointer.last_path} does not exist")
        self._build_model()
        self._build_loaders()
        self.epoch = self.step = self.global_step = 0
        self.best_acc1, self.best_epoch = -1.0, 0
        self.meter = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, images, skipped
        self.resumed: TrainCheckpoint | None = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out) if self.main else None
        if resume:
            self._resume()
        if self.main:
            write_json(self.out / "config.json", config_dict(config))

    # -- set-up --

    def _build_model(self) -> None:
        config = self.config
        self.model_args = model_args(config, self.splits.classes)
        torch.manual_seed(config.seed)
        net = get_model(config.model, weights=config.weights, new_head=True, **self.model_args)
        self.card = model_card(config, self.splits.classes, net)
        # channels last: NDHWC for volumes
        self.memory_format = (
            torch.channels_last_3d if self.card.volume is not None else torch.channels_last
        )
        weights = pos_weight(self.splits.train) if config.pos_weight == "auto" else None  # type: ignore[arg-type]
        self.pos_weight = weights.to(self.device) if weights is not None else None
        if config.memory_efficient:
            net.set_memory_efficient(config.memory_efficient)
        if config.sync_bn and self.ddp:
            if self.device.type != "cuda":
                raise TrainingError("sync_bn needs CUDA GPUs; SyncBatchNorm does not run on CPU")
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = net.to(self.device)
        if config.channels_last:
            net = net.to(memory_format=self.memory_format)
        self.net = net
        self.optimizer = make_optimizer(net, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, config)
        )
        self.amp_dtype = amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype is torch.float16
        )
        model: nn.Module = net
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(net, device_ids=ids)
        self.model = torch.compile(model) if config.compile else model

    def _build_loaders(self) -> None:
        config, splits = self.config, self.splits
        train_set = TransformedDataset(splits.train, self._train_transform(), seed=config.seed)
        self.sampler = ShardedBatchSampler(
            len(train_set),
            config.batch_size,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
            accumulate=config.accumulate,
        )
        self.train_loader = DataLoader(
            train_set,
            batch_sampler=self.sampler,
            num_workers=config.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=config.workers > 0,
            generator=torch.Generator().manual_seed(config.seed),
        )
        evaluation = self.card.transform()
        self.eval_loaders = {
            name: self._eval_loader(dataset, evaluation)
            for name, dataset in (("val", splits.val), ("test", splits.test))
            if dataset is not None
        }

    def _train_transform(self) -> Callable[[Any], Tensor]:
        """A training image or volume -> the network input, randomly changed as ``augment``
        says (volumes: resampled and scaled as the card says, then ``VolumeAugment`` unless
        ``augment`` is ``"none"``)."""
        config, volume = self.config, self.card.volume
        if volume is None:
            return train_transform(config.augment, config.image_size, config.mean, config.std)  # type: ignore[arg-type]
        return volume if config.augment == "none" else Compose([volume, VolumeAugment()])

    def _eval_loader(self, dataset, transform) -> DataLoader:
        dataset = TransformedDataset(dataset, transform)
        if self.ddp:
            dataset = Subset(dataset, list(shard_indices(len(dataset), self.rank, self.world_size)))
        return DataLoader(
            dataset,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            num_workers=self.config.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    # -- checkpoints --

    def _checkpoint(self) -> TrainCheckpoint:
        return TrainCheckpoint(
            card=self.card,
            model=self.net.state_dict(),
            model_args=self.model_args,
            config=config_dict(self.config),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            step=self.step,
            global_step=self.global_step,
            best_acc1=self.best_acc1,
            best_epoch=self.best_epoch,
            meter=self.meter.tolist(),
        )

    def _save(self, best: bool = False) -> None:
        self._sync_buffers()
        self.checkpointer.save(self._checkpoint(), best)  # every rank takes part

    def _resume(self) -> None:
        checkpoint = self.checkpointer.resume(config_dict(self.config), list(self.splits.classes))
        self.net.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.epoch, self.step = checkpoint.epoch, checkpoint.step
        self.global_step = checkpoint.global_step
        self.best_acc1, self.best_epoch = checkpoint.best_acc1, checkpoint.best_epoch
        self.meter = torch.tensor(checkpoint.meter, dtype=torch.float64)
        self.resumed = checkpoint
        if self.metrics is not None:  # drop epochs done after this checkpoint
            self.metrics.truncate(self.epoch)

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics (DDP keeps them per process)."""
        if self.ddp:
            for buffer in self.net.buffers():
                dist.broadcast(buffer, 0)

    # -- training --

    def _diverged(self, value: float) -> TrainingError:
        last = self.checkpointer.last_path
        if last.exists():
            kept = f"the last good checkpoint, {last}, is kept"
        else:
            kept = "no checkpoint had been written yet"
        return TrainingError(
            f"loss is {value} at epoch {self.epoch + 1}, step {self.step + 1}: training diverged "
            f"and was stopped; {kept}. Lower the learning rate (or use --amp none) and resume"
        )

    def _backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and (scaled) backward of one micro-batch; returns (loss sum, correct, images).

        A micro-batch whose images were all unreadable still runs a forward and backward, on a
        zero image in eval mode (no statistics, no dropout) with a zero loss: every process then
        joins DDP's gradient all-reduce (contributing zeros) and GradScaler sees gradients."""
        empty = labels.numel() == 0
        if empty:
            images = torch.zeros(1, *self.card.input_shape, device=self.device)
            self.model.eval()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=self.memory_format)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            logits = self.model(images)
        if empty:
            self.model.train()
            self.scaler.scale(logits.float().sum() * 0).backward()
            return torch.zeros(3, dtype=torch.float64, device=self.device)
        if self.card.multi_label:  # correct: the fraction of labels right at 0.5, per image
            loss = F.binary_cross_entropy_with_logits(
                logits.float(), labels, pos_weight=self.pos_weight
            )
            correct = ((logits > 0) == (labels > 0.5)).float().mean(1).sum()
        else:
            loss = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.config.label_smoothing
            )
            correct = (logits.argmax(dim=1) == labels).sum()
        self.scaler.scale(loss / self.config.accumulate).backward()
        return torch.stack(
            [loss.detach() * labels.numel(), correct, labels.new_tensor(labels.numel())]
        ).to(torch.float64)

    def _train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accumulate`` micro-batches; returns this step's global
        (loss sum, correct, images, skipped) as float64 on the CPU. Every process runs the same
        forwards and backwards; a step without any image anywhere changes no weight."""
        config = self.config
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(config.accumulate):
            images, labels, skipped = next(batches)
            stats[3] += skipped
            last = micro == config.accumulate - 1
            no_sync = self.model.no_sync if self.ddp and not last else nullcontext
            with no_sync():
                stats[:3] += self._backward(images, labels)
        if self.ddp:
            dist.all_reduce(stats)
        stats = stats.cpu()
        if not math.isfinite(stats[0].item()):
            raise self._diverged(stats[0].item() / max(stats[2].item(), 1))
        if stats[2].item() > 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return stats

    def _train_epoch(self) -> dict[str, float]:
        config = self.config
        steps = self.sampler.steps_per_epoch
        self.sampler.set_epoch(self.epoch, self.step)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        start, seen = time.perf_counter(), 0.0
        batches = iter(self.train_loader)
        with tqdm(
            total=steps,
            initial=self.step,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            unit="step",
            disable=not (config.progress and self.main),
            leave=False,
        ) as bar:
            while self.step < steps:
                stats = self._train_step(batches)
                self.meter += stats
                self.step += 1
                self.global_step += 1
                seen += stats[2].item()
                loss_sum, correct, count, _ = self.meter.tolist()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / max(count, 1):.4f}",
                    acc=f"{100 * correct / max(count, 1):.2f}%",
                    lr=f"{lr:.3g}",
                    img_s=f"{seen / (time.perf_counter() - start):.0f}",
                )
                every = config.checkpoint_every_steps
                if every and self.step % every == 0 and self.step < steps:
                    self._save()
        loss_sum, correct, count, skipped = self.meter.tolist()
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100 * correct / max(count, 1),
            "train_images": int(count),
            "train_skipped": int(skipped),
            "lr": lr,
            "images_per_second": seen / (time.perf_counter() - start),
        }

    def _evaluate_labels(self, split: str) -> dict[str, Any]:
        """Per-label and mean AUROC and average precision (``label_metrics``) on ``split``; under
        ``torchrun`` each process predicts its shard and the metrics are of all shards."""
        self._sync_buffers()
        sigmoids = ModuleProbabilities(
            self.net, self.device, self.amp_dtype, normalise=torch.sigmoid
        )
        probabilities, targets, skipped = predict_labels(
            sigmoids.probabilities, self.eval_loaders[split]
        )
        if self.ddp:
            shards: list[Any] = [None] * self.world_size
            dist.all_gather_object(shards, (probabilities, targets, skipped))
            probabilities = torch.cat([shard[0] for shard in shards])
            targets = torch.cat([shard[1] for shard in shards])
            skipped = sum(shard[2] for shard in shards)
        return {**label_metrics(probabilities, targets, self.splits.classes), "skipped": skipped}

    def _validate(self) -> tuple[float, dict[str, Any]]:
        """The validation score that picks the best epoch (top-1 %, or mean AUROC for a
        multi-label model) and the epoch record's validation fields."""
        if self.card.multi_label:
            val = self._evaluate_labels("val")
            keys = ("mean_auroc", "mean_ap", "labels", "images", "skipped")
            return val["mean_auroc"], {f"val_{key}": val[key] for key in keys}
        result = self._evaluate("val")
        keys = ("loss", "top1", "top5", "images", "skipped")
        return result.top1, {f"val_{key}": getattr(result, key) for key in keys}

    @staticmethod
    def _summary(val: dict[str, Any]) -> str:
        if "val_mean_auroc" in val:
            return f"val mean AUROC {val['val_mean_auroc']:.4f} mean AP {val['val_mean_ap']:.4f}"
        top = f"top-1 {val['val_top1']:.2f}% top-5 {val['val_top5']:.2f}%"
        return f"val loss {val['val_loss']:.4f} {top}"

    def _check_readable(self, images: int, skipped: int) -> None:
        """Fail an epoch that read no training image, or skipped more than ``max_unreadable``."""
        total, limit = images + skipped, self.config.max_unreadable
        if images and skipped <= limit * total:
            return
        raise TrainingError(
            f"epoch {self.epoch + 1}: {skipped} of {total} training images could not be read "
            f"(over the limit of {limit:.0%}); the warnings above name them. Fix or remove them, "
            "or raise --max-unreadable"
        )

    def _evaluate(self, split: str) -> EvalResult:
        self._sync_buffers()
        return evaluate(
            self.net,
            self.eval_loaders[split],
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=bool(self.config.channels_last),
            distributed=self.ddp,
            progress=self.config.progress and self.main,
            desc=split,
        )

    def run(self) -> dict[str, Any]:
        config = self.config
        if self.resumed is not None:
            self.checkpointer.restore_rng(self.resumed)
        while self.epoch < config.epochs:
            started = time.perf_counter()
            record = self._train_epoch()
            self._check_readable(record["train_images"], record["train_skipped"])
            self.scheduler.step()
            score, val = self._validate()
            self.epoch += 1
            self.step = 0
            self.meter.zero_()
            best = score > self.best_acc1  # the best validation score: top-1, or mean AUROC
            if best:
                self.best_acc1, self.best_epoch = score, self.epoch
            record = {"epoch": self.epoch, **record, **val}
            record["seconds"] = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.append(record)
                self._log(record, val)
            self._save(best=best)
        return self._finish()

    def _log(self, record: dict[str, Any], val: dict[str, Any]) -> None:
        """One line for the finished epoch's ``record``."""
        skipped = record["train_skipped"]
        log.info(
            "epoch %d/%d  train loss %.4f top-1 %.2f%%  %s  lr %.3g  %.0f img/s%s",
            self.epoch,
            self.config.epochs,
            record["train_loss"],
            record["train_top1"],
            self._summary(val),
            record["lr"],
            record["images_per_second"],
            f"  ({skipped} unreadable images skipped)" if skipped else "",
        )

    def _finish(self) -> dict[str, Any]:
        paths = self.checkpointer
        summary: dict[str, Any] = {
            "out": str(self.out),
            "epochs": self.config.epochs,
            "best_epoch": self.best_epoch,
            "best_val_mean_auroc" if self.card.multi_label else "best_val_top1": self.best_acc1,
            "last_checkpoint": str(paths.last_path),
            "best_checkpoint": str(paths.best_path),
        }
        if "test" in self.eval_loaders:  # the model of the best validation epoch, tested once
            if self.main:
                self.net.load_state_dict(read_checkpoint(paths.best_path).model)
            if self.ddp:  # from rank 0: other nodes may not see its files
                for tensor in self.net.state_dict().values():
                    dist.broadcast(tensor, 0)
            summary["test"] = (
                self._evaluate_labels("test")
                if self.card.multi_label
                else self._evaluate("test").to_dict()
            )
        if self.main:
            write_json(self.out / "results.json", summary)
            if self.metrics is not None:
                self.metrics.close()
        return summary


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume``, continue from ``<out>/last.pth``) the training ``config``
    describes; under ``torchrun`` every process calls this. Writes into ``config.out``:
    ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one line per epoch),
    ``last.pth`` and ``best.pth`` (best validation top-1), ``results.json``, and TensorBoard
    logs when ``tensorboard`` is installed. Returns the summary in ``results.json``."""
    with process_group(config.device) as (rank, world_size, device):
        return Trainer(config, resume, rank, world_size, device).run()
