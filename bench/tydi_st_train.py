"""The same 200-step fine-tune with the sentence-transformers 5.1.0 CrossEncoderTrainer (reference for train.py)."""
import json, time, torch, datasets
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
rows = [json.loads(l) for l in open("../shared/data/tydiqa_ru/train.jsonl", encoding="utf-8")]
model = CrossEncoder("runs/standin", device="cpu", max_length=160)
with torch.no_grad():
    for p in model.model.parameters():
        p.data = p.data.clone()  # aligned copies; unaligned memory-mapped ones give the same run (make_train_golden.py)
ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("query", "passage", "label")})
args = CrossEncoderTrainingArguments(output_dir="runs/st-tmp", max_steps=200, per_device_train_batch_size=16,
    learning_rate=5e-5, seed=42, optim="adamw_torch", use_cpu=True, logging_steps=25, save_strategy="no",
    report_to="none", disable_tqdm=True)
t = time.time()
out = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=BinaryCrossEntropyLoss(model)).train()
print("train_loss", out.training_loss, "runtime", time.time() - t)
model.save_pretrained("runs/tydi-st")
