#!/usr/bin/env bash
# Refit the calibrated profiles from the shipped measurements and rewrite validation/ (deterministic).
set -euo pipefail
cd "$(dirname "$0")/.."
# Layer ops and NCCL collectives from Vidur; attention kernels and vLLM's custom all-reduce from aiconfigurator.
# Held out: whole models (layer ops), whole head layouts (attention), GEMMs with K = 5120 or 8192 (the hidden
# sizes of 13B/34B and 70B models), 8-GPU groups (collectives), the fused-MoE shape of Mixtral-8x7B (every TP).
# GEMM curves come from aiconfigurator's vLLM 0.14 GEMMs only (the engine version of the end-to-end runs); Vidur's
# layer GEMMs, from an older stack, validate them.
llmsim calibrate --device a100-80gb --measurements hardware_profiles/measurements/vidur-a100.csv.gz \
  --measurements hardware_profiles/measurements/aiconfigurator-a100.csv.gz \
  --hold-out-model Qwen/Qwen-72B --hold-out-model internlm/internlm-20b \
  --hold-out-model meta-llama/Meta-Llama-3-70B --hold-out-model microsoft/phi-2 --hold-out-workers 8 \
  --hold-out-heads 32/8 --hold-out-heads 64/8 --hold-out-heads 40/40 --hold-out-gemm-k 5120 --hold-out-gemm-k 8192 \
  --gemm-source aiconfigurator
llmsim calibrate --device h100-sxm --measurements hardware_profiles/measurements/vidur-h100.csv.gz \
  --measurements hardware_profiles/measurements/aiconfigurator-h100.csv.gz \
  --hold-out-model codellama/CodeLlama-34b-Instruct-hf --hold-out-model microsoft/phi-2 \
  --hold-out-model "moe h4096 i14336 e8 k2" --hold-out-workers 8 \
  --hold-out-heads 32/8 --hold-out-heads 64/8 --hold-out-heads 40/40 --hold-out-gemm-k 5120 --hold-out-gemm-k 8192 \
  --gemm-source aiconfigurator
# The per-layer sum on one software stack. vLLM 0.14, whose GEMMs the two profiles above model, has no per-layer
# measurements; Vidur's layers have them, on Vidur's own (older) stack. With the GEMM curves fitted on Vidur's GEMMs of
# the fitted models (--gemm-source vidur), the held-out models' layer sums check that a layer's ops add up to its time.
# Reports only (validation/vidur_stack/); the profiles this fits go to results/, which is not shipped.
llmsim calibrate --device a100-80gb --measurements hardware_profiles/measurements/vidur-a100.csv.gz \
  --hold-out-model Qwen/Qwen-72B --hold-out-model internlm/internlm-20b \
  --hold-out-model meta-llama/Meta-Llama-3-70B --hold-out-model microsoft/phi-2 --hold-out-workers 8 \
  --gemm-source vidur --out results/vidur_stack/a100-80gb.yaml --report-dir hardware_profiles/validation/vidur_stack
llmsim calibrate --device h100-sxm --measurements hardware_profiles/measurements/vidur-h100.csv.gz \
  --hold-out-model codellama/CodeLlama-34b-Instruct-hf --hold-out-model microsoft/phi-2 --hold-out-workers 8 \
  --gemm-source vidur --out results/vidur_stack/h100-sxm.yaml --report-dir hardware_profiles/validation/vidur_stack
llmsim calibrate --device cpu --measurements hardware_profiles/measurements/cpu-small.csv --hold-out-model Llama-3-8B
# CPU time per engine step of a vLLM v0-style engine (Sarathi-Serve's code base), from Vidur's measurements on an
# A100 server; Llama-2-70B held out, the A40 server's file validated only.
llmsim calibrate-cpu --measurements hardware_profiles/measurements/vidur-cpu-overheads-a100.csv \
  --hold-out-model meta-llama/Llama-2-70b-hf --check hardware_profiles/measurements/vidur-cpu-overheads-a40.csv \
  --source "Vidur (github.com/microsoft/vidur, MIT) data/profiling/a100/cpu_overheads.csv: the Sarathi-Serve engine (vLLM v0 code base, Ray workers), decode steps of 8-64 requests, Llama-2-7B/70B and CodeLlama-34B at TP 1/2/4, on an A100 server" \
  --out hardware_profiles/cpu_overhead/vllm_v0.yaml
