// tools/peft_check helper: see README.md.
//   save-base DIR                 tiny preset base (random Mixtral-style MoE, seed 0, all 6 blocks) as a Hub checkpoint
//                                 (legacy Mixtral layout: block_sparse_moe.experts.E.w1/w2/w3) + config.json + tokenizer.json
//   make-inputs DIR OUT           padded batch (right- and left-padded rows) tokenised with DIR/tokenizer.json
//   run MODEL ADAPTER INPUTS OUT  MoeLora runtime: base forward, then LoadPeftAdapter and forward again; writes
//                                 base_hidden_states/base_logits/hidden_states/logits + metadata (trainable count)
using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Training;
using TorchSharp;
using static TorchSharp.torch;

static class Program
{
    static int Main(string[] args)
    {
        switch (args.FirstOrDefault())
        {
            case "save-base": SaveBase(args[1]); return 0;
            case "make-inputs": MakeInputs(args[1], args[2]); return 0;
            case "run": Run(args[1], args[2], args[3], args[4]); return 0;
            default: Console.Error.WriteLine("usage: save-base DIR | make-inputs DIR OUT | run MODEL ADAPTER INPUTS OUT"); return 2;
        }
    }

    static void SaveBase(string dir)
    {
        Directory.CreateDirectory(dir);
        var cfg = JsonNode.Parse(TrainPreset.TinyConfigJson())!.AsObject();
        using var model = TorchModelFactory.Random(cfg.ToJsonString(), 0); // as CbModels.Load(null, ...), all 6 blocks
        int inter = cfg["intermediate_size"]!.GetValue<int>();
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, t) in model.StateDict())
        {
            var n = name.Replace(".mlp.", ".block_sparse_moe.", StringComparison.Ordinal);
            if (n.EndsWith(".experts.gate_up_proj", StringComparison.Ordinal))
            {
                var p = n[..^"gate_up_proj".Length];
                for (long e = 0; e < t.shape[0]; e++)
                {
                    tensors.Add(new($"{p}{e}.w1.weight", t[e].narrow(0, 0, inter).contiguous()));
                    tensors.Add(new($"{p}{e}.w3.weight", t[e].narrow(0, inter, inter).contiguous()));
                }
            }
            else if (n.EndsWith(".experts.down_proj", StringComparison.Ordinal))
            {
                var p = n[..^"down_proj".Length];
                for (long e = 0; e < t.shape[0]; e++) tensors.Add(new($"{p}{e}.w2.weight", t[e].contiguous()));
            }
            else tensors.Add(new(n, t.contiguous()));
        }
        Safetensors.Save(Path.Combine(dir, "model.safetensors"), tensors.OrderBy(x => x.Key, StringComparer.Ordinal),
            new Dictionary<string, string> { ["format"] = "pt" });
        cfg["dtype"] = "float32";
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), TrainPreset.TinyTokenizerJson());

        // Round trip: the saved checkpoint loads into the same model (same logits bit for bit).
        using var loaded = TorchModelFactory.Load(dir);
        loaded.Eval(); model.Eval();
        var ids = arange(0, 24, ScalarType.Int64).reshape(2, 12) * 7 % 262;
        using (no_grad())
        {
            using var a = model.Forward(ids, outputHiddenStates: true);
            using var b = loaded.Forward(ids, outputHiddenStates: true);
            double d = (a.Logits - b.Logits).abs().max().item<float>();
            Console.WriteLine($"save-base: {tensors.Count} tensors in {dir}/model.safetensors; reload max |Δlogits| = {d}");
            if (d != 0) throw new InvalidOperationException("round trip changed the model");
        }
    }

    static void MakeInputs(string dir, string output)
    {
        var tok = MoeLora.Torch.Text.HfTokenizer.Load(Path.Combine(dir, "tokenizer.json"));
        string[] texts =
        [
            "How do I activate a Zorbl device in one hour? Step 1: take the quark spindle.",
            "Is water wet? Water makes things wet.",
            "Name a fruit that is yellow.",
            "How do I tune a Zorbl device quietly? Step 2: wire the spark lattice to it.",
        ];
        var seqs = texts.Select(t => tok.Encode(t).Take(40).Select(x => (long)x).ToArray()).ToList();
        int s = seqs.Max(x => x.Length);
        long pad = 261;
        var ids = new long[seqs.Count * s];
        var mask = new long[seqs.Count * s];
        for (int i = 0; i < seqs.Count; i++)
        {
            bool left = i == 2; // one left-padded row (as the trainer's CB requests), the others right-padded
            int off = left ? s - seqs[i].Length : 0;
            for (int j = 0; j < s; j++) { ids[i * s + j] = pad; }
            for (int j = 0; j < seqs[i].Length; j++) { ids[i * s + off + j] = seqs[i][j]; mask[i * s + off + j] = 1; }
        }
        Safetensors.Save(output, [new("input_ids", tensor(ids, [seqs.Count, s])), new("attention_mask", tensor(mask, [seqs.Count, s]))],
            new Dictionary<string, string> { ["format"] = "pt", ["padding"] = "rows 0,1,3 right-padded; row 2 left-padded; pad id 261" });
        Console.WriteLine($"make-inputs: [{seqs.Count},{s}] lengths {string.Join(",", seqs.Select(x => x.Length))} -> {output}");
    }

    static void Run(string modelDir, string adapterDir, string inputs, string output)
    {
        using var model = TorchModelFactory.Load(modelDir);
        model.Eval();
        var t = Safetensors.Load(inputs);
        var ids = t["input_ids"].to(ScalarType.Int64);
        var mask = t["attention_mask"].to(ScalarType.Int64);
        using var g = no_grad();
        using var b = model.Forward(ids, mask, outputHiddenStates: true);
        // LoraInjector.LoadPeftAdapter first (strict); if the file lacks tensors that the injection created (e.g. expert
        // LoRA on blocks the trainer truncated away), inject and copy the file's tensors, leaving the missing ones as
        // injected and zeroing their lora_B (no update where the file has none); the missing keys are recorded.
        InjectedAdapter adapter;
        var missing = new List<string>();
        string loadMode = "LoadPeftAdapter (strict)";
        try { adapter = LoraInjector.LoadPeftAdapter(model, adapterDir); }
        catch (InvalidDataException e)
        {
            Console.WriteLine($"run: strict LoadPeftAdapter failed: {e.Message.Split('\n')[0]} ({e.Message.Split('\n').Length - 1} lines)");
            loadMode = "lenient (strict load failed; missing lora_B zeroed)";
            var m2 = TorchModelFactory.Load(modelDir); m2.Eval();
            RunLenient(m2, modelDir, adapterDir, ids, mask, b, output, loadMode);
            return;
        }
        model.Eval();
        Write(model, adapter, ids, mask, b, output, loadMode, missing);
    }

    static void RunLenient(CausalLm model, string modelDir, string adapterDir, Tensor ids, Tensor mask, MoeLora.Torch.Models.CausalLmOutput b,
        string output, string loadMode)
    {
        using var _m = model;
        var adapter = LoraInjector.Inject(model, LoraInjector.Plan(model, File.ReadAllText(Path.Combine(adapterDir, "adapter_config.json"))));
        var file = Safetensors.Load(Path.Combine(adapterDir, "adapter_model.safetensors"));
        var missing = new List<string>();
        var used = new HashSet<string>();
        foreach (var (name, p) in LoraInjector.PeftNamedParameters(model))
        {
            var key = name.Replace(".default.", ".", StringComparison.Ordinal);
            if (file.TryGetValue(key, out var t))
            {
                if (!t.shape.SequenceEqual(p.shape)) throw new InvalidDataException($"shape mismatch {key}");
                p.copy_(t); used.Add(key);
            }
            else
            {
                missing.Add(key);
                if (key.Contains(".lora_B.", StringComparison.Ordinal)) p.zero_();
            }
        }
        var unexpected = file.Keys.Where(k => !used.Contains(k)).ToList();
        if (unexpected.Count > 0) throw new InvalidDataException("unexpected keys: " + string.Join(", ", unexpected));
        model.Eval();
        Console.WriteLine($"run: lenient load: {missing.Count} missing keys (lora_B zeroed): {string.Join(", ", missing.Take(6))}{(missing.Count > 6 ? ", ..." : "")}");
        Write(model, adapter, ids, mask, b, output, loadMode, missing);
    }

    static void Write(CausalLm model, InjectedAdapter adapter, Tensor ids, Tensor mask, MoeLora.Torch.Models.CausalLmOutput b,
        string output, string loadMode, List<string> missing)
    {
        long trainable = LoraInjector.PeftNamedParameters(model).Sum(p => p.Param.numel());
        long total = model.NamedParameters().Sum(p => p.Param.numel());
        using var a = model.Forward(ids, mask, outputHiddenStates: true);
        Safetensors.Save(output,
        [
            new("hidden_states", stack(a.HiddenStates.ToArray(), 0).contiguous()),
            new("logits", a.Logits.contiguous()),
            new("base_hidden_states", stack(b.HiddenStates.ToArray(), 0).contiguous()),
            new("base_logits", b.Logits.contiguous()),
            new("input_ids", ids.contiguous()),
            new("attention_mask", mask.contiguous()),
        ], new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["trainable"] = trainable.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["total"] = total.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["wrappers"] = adapter.Wrappers.Count.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["load_mode"] = loadMode,
            ["missing_in_file"] = string.Join(",", missing),
        });
        var m = mask.unsqueeze(-1).to(ScalarType.Float32);
        double delta = ((a.Logits - b.Logits).abs() * m).max().item<float>();
        Console.WriteLine($"run: {adapter.Wrappers.Count} wrappers, trainable {trainable} of {total}; max |logits(adapter) - logits(base)| (mask=1) = {delta:G4} -> {output}");
    }
}
