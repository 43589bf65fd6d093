using System.Text.RegularExpressions;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;

namespace MoeLora.Core.Modules;

/// <summary>
/// The one checkpoint-mapping table: for each parameter of one layout's tree, the parameters of the other layout's
/// tree that hold the same values. Checkpoints are written in the <see cref="Layout.V4"/> names (the keys
/// transformers 5's <c>save_pretrained</c> writes) while transformers 5 runs the <see cref="Layout.V5"/> modules: it
/// loads by renaming and by stacking per-expert <c>nn.Linear</c> weights into fused 3-D parameters
/// (<c>gate_up_proj[e] = cat(gate_e, up_e)</c>, <c>down_proj[e] = down_e</c>), and saves them back the same way. This
/// class rebuilds that correspondence from the two trees Core builds for one config, using only structure (layer,
/// location, shape) and the projection roles of that conversion, never a model's name. The checkpoint cross-check,
/// the runtime's loader and precheck, and merge all read it.
/// </summary>
public sealed partial class CheckpointLayout
{
    private readonly Dictionary<string, Alternative> _alternatives = new(StringComparer.Ordinal);

    /// <summary>The other layout's parameters that store this one, or null when none does.</summary>
    public Alternative? For(string parameterName) => _alternatives.GetValueOrDefault(parameterName);

    /// <summary>Every parameter that has an alternative, with it.</summary>
    public IReadOnlyDictionary<string, Alternative> Alternatives => _alternatives;

    /// <param name="Parts">Parameters of the other layout, in stacking order (expert by expert, gate before up).</param>
    /// <param name="IsSliceOfFused">True when this parameter is one expert's slice of a single fused parameter.</param>
    /// <param name="NumExperts">For a fused parameter stored as per-expert parts: the experts (0 for a plain rename).</param>
    /// <param name="Concatenated">This parameter is its parts concatenated along <paramref name="ConcatDim"/> (Kimi Linear's
    /// <c>conv1d.weight</c> = cat(q_conv1d, k_conv1d, v_conv1d), transformers' <c>Concatenate(dim=0)</c>; Step-3.7's
    /// <c>experts.gate_up_proj</c> = cat(moe.gate_proj.weight, moe.up_proj.weight) along dimension 1).</param>
    /// <param name="ConcatDim">The dimension a concatenation joins its parts along.</param>
    /// <param name="Chunk">This parameter is rows [Offset, Offset + its rows) of its one part (transformers' <c>Chunk(dim=0)</c>
    /// of a stored fused tensor into q, k and v: Step-3.7's vision <c>in_proj_weight</c>, Kimi K2.5's vision <c>wqkv</c>), those rows permuted for rope per
    /// <see cref="RopeChunk.PermuteHeads"/>; null: not a chunk.</param>
    /// <param name="Interleaved">This parameter is rows of its one part, whose rows (its last-but-one dimension)
    /// alternate gate and up (<see cref="ModelSpec.CheckpointGateUpInterleaved"/>); <see cref="InterleavedRows.None"/>
    /// otherwise.</param>
    /// <param name="Transposed">This parameter is its one 2-D part transposed (transformers' <c>Transpose(0, 1)</c>:
    /// ERNIE 4.5 VL's routers, stored [H, E]; <see cref="ModelSpec.CheckpointRoutersTransposed"/>).</param>
    public sealed record Alternative(IReadOnlyList<ParameterNode> Parts, bool IsSliceOfFused, int NumExperts = 0, bool Concatenated = false,
        int ConcatDim = 0, RopeChunk? Chunk = null, InterleavedRows Interleaved = InterleavedRows.None, bool Transposed = false)
    {
        /// <summary>True when this fused [E, rows, cols] parameter is stored as per-expert 2-D parts.</summary>
        public bool IsStack => NumExperts > 0;

        /// <summary>
        /// For a stack: each part with its expert and its first row in that expert's slice
        /// (<c>fused[expert][RowOffset : RowOffset + rows(part)] = part</c>); for a concatenation: each part with expert
        /// −1 and its first row in the whole parameter (<c>param[RowOffset : RowOffset + rows(part)] = part</c>).
        /// </summary>
        public IEnumerable<(ParameterNode Part, int Expert, long RowOffset)> Pieces()
        {
            if (Concatenated)
            {
                long at = 0;
                foreach (var part in Parts)
                {
                    yield return (part, -1, at);
                    at += part.Shape[ConcatDim];
                }
                yield break;
            }
            if (!IsStack) yield break;
            int perExpert = Parts.Count / NumExperts;
            for (int e = 0; e < NumExperts; e++)
            {
                long offset = 0;
                for (int j = 0; j < perExpert; j++)
                {
                    var part = Parts[e * perExpert + j];
                    yield return (part, e, offset);
                    offset += part.Shape[0];
                }
            }
        }
    }

    /// <summary>Which rows of a stored gate/up-interleaved tensor a parameter holds.</summary>
    public enum InterleavedRows
    {
        /// <summary>Not interleaved.</summary>
        None,

        /// <summary>The even rows (the gate projection).</summary>
        Even,

        /// <summary>The odd rows (the up projection).</summary>
        Odd,

        /// <summary>All of them, the even rows first, then the odd ones (a fused gate_up_proj of the same shape).</summary>
        EvenThenOdd,
    }

    /// <summary>
    /// A row chunk of a stored tensor: rows [<paramref name="Offset"/>, <paramref name="Offset"/> + rows). With
    /// <paramref name="PermuteHeads"/> &gt; 0 transformers' <c>PermuteForRope</c> follows on load: within each of that many
    /// heads, the rows stored as interleaved (half_head, 2) pairs are read as (2, half_head), i.e.
    /// <c>loaded[h, j, i] = stored[h, i, j]</c>; saving applies the inverse.
    /// </summary>
    public sealed record RopeChunk(long Offset, long PermuteHeads);

    private enum Role { Gate, Up, Down }

    /// <summary>
    /// The mapping between the checkpoint layout (v4 names) and <paramref name="spec"/>'s tree, or null when the
    /// config has no tree in the other layout.
    /// </summary>
    public static CheckpointLayout? For(ModelSpec spec)
    {
        try
        {
            var other = ArchitectureRegistry.Build(spec.Config, spec.Layout == Layout.V5 ? Layout.V4 : Layout.V5).Tree;
            return Build(spec.Tree, other, spec.CheckpointGateUpInterleaved, spec.Layout == Layout.V5 ? spec.InProjRopeHeads : null,
                spec.CheckpointRoutersTransposed);
        }
        catch (ConfigException)
        {
            return null;
        }
    }

    /// <param name="gateUpInterleaved">The other tree stores gate and up rows interleaved in one tensor
    /// (<see cref="ModelSpec.CheckpointGateUpInterleaved"/>).</param>
    /// <param name="inProjRopeHeads">Heads of the rope permutation of q and k chunked out of a stored in_proj (see
    /// <see cref="ModelSpec.InProjRopeHeads"/>); null: none.</param>
    /// <param name="routersTransposed">The other tree's router weights are the transposes of this one's
    /// (<see cref="ModelSpec.CheckpointRoutersTransposed"/>).</param>
    public static CheckpointLayout Build(ModuleTree runtime, ModuleTree other, bool gateUpInterleaved = false, long? inProjRopeHeads = null,
        bool routersTransposed = false)
    {
        var result = new CheckpointLayout();
        var otherByName = AllParameters(other).ToDictionary(p => p.Name, StringComparer.Ordinal);
        var runtimeNames = AllParameters(runtime).Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
        var unpairedRuntime = AllParameters(runtime).Where(p => !otherByName.ContainsKey(p.Name)).ToList();
        var unpairedOther = otherByName.Keys.Where(n => !runtimeNames.Contains(n)).ToHashSet(StringComparer.Ordinal);

        if (gateUpInterleaved) result.PairInterleaved(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        result.PairExperts(runtime, other, unpairedRuntime, unpairedOther);
        result.PairConcatenated(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        result.PairStackedGateUp(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        result.PairInProjChunks(runtime, other, unpairedRuntime, unpairedOther, otherByName, inProjRopeHeads ?? 0);
        result.PairChunks(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        result.PairRowSplits(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        if (routersTransposed) result.PairTransposedRouters(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        result.PairByStructure(runtime, other, unpairedRuntime, unpairedOther, otherByName);
        return result;
    }

    // Fused runtime parameters take the other tree's per-expert weights of the same layer; per-expert runtime
    // weights point at their slice of the other tree's fused parameter. Several fused modules of one layer (ERNIE 4.5
    // VL's text_moe and vision_moe experts, transformers' ErnieFuseAndSplitTextVisionExperts) share one per-expert list
    // and take its experts in registration order: the first module experts 0..E1-1, the next E1..E1+E2-1.
    private void PairExperts(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther)
    {
        var perExpertOther = PerExpertWeights(other, unpairedOther).ToList();
        var firstExpert = new Dictionary<(int?, string), int>();
        foreach (ParameterNode fused in unpairedRuntime.ToList())
        {
            ModuleNode owner = runtime.OwnerOf(fused);
            if (owner.Kind != ModuleKind.Experts || owner.IsTransposed) continue;
            // A fused up_proj without a gate_proj beside it belongs to non-gated experts (Nemotron-H): up_proj[e] = up_e.
            bool nonGated = fused.LocalName == "up_proj" && owner.Parameters.All(p => p.LocalName != "gate_proj");
            Role[]? roles = fused.LocalName switch
            {
                "gate_up_proj" => [Role.Gate, Role.Up],
                "up_proj" when nonGated => [Role.Up],
                "down_proj" => [Role.Down],
                _ => null,
            };
            if (roles is null) continue;
            var candidates = perExpertOther.Where(w => w.Layer == owner.LayerIndex && roles.Contains(w.Role)).ToList();
            var parts = new List<ParameterNode>();
            // The parameter's own expert rows: LongCat's gate_up_proj also holds its identity experts' (unused) slices.
            long experts = fused.Shape.Length == 3 ? fused.Shape[0] : owner.NumExperts;
            var claimedKey = (owner.LayerIndex, fused.LocalName);
            int first = firstExpert.GetValueOrDefault(claimedKey);
            for (int expert = 0; expert < experts; expert++)
                foreach (Role role in roles)
                    if (candidates.FirstOrDefault(w => w.Expert == first + expert && w.Role == role) is { } part) parts.Add(part.Parameter);
            if (parts.Count != experts * roles.Length) continue;
            firstExpert[claimedKey] = first + (int)experts;
            _alternatives[fused.Name] = new Alternative(parts, IsSliceOfFused: false, (int)experts);
            unpairedRuntime.Remove(fused);
            foreach (ParameterNode part in parts) unpairedOther.Remove(part.Name);
        }

        var fusedOther = AllParameters(other).Where(p => other.OwnerOf(p) is { Kind: ModuleKind.Experts, IsTransposed: false }).ToList();
        foreach (var weight in PerExpertWeights(runtime, unpairedRuntime.Select(p => p.Name).ToHashSet(StringComparer.Ordinal)).ToList())
        {
            string fusedName = weight.Role == Role.Down ? "down_proj" : "gate_up_proj";
            ParameterNode? fused = fusedOther.FirstOrDefault(p => p.LocalName == fusedName && other.OwnerOf(p).LayerIndex == weight.Layer);
            if (fused is null) continue;
            _alternatives[weight.Parameter.Name] = new Alternative([fused], IsSliceOfFused: true);
            unpairedRuntime.Remove(weight.Parameter);
            unpairedOther.Remove(fused.Name);
        }
    }

    // Gate and up stored as one tensor of alternating rows (transformers' Interleave on the row dimension, the last but
    // one): a runtime gate_up_proj takes the stored tensor of its shape (even rows first, then odd ones); a runtime
    // gate_proj / up_proj pair (3-D shared-expert parameters, or the weights of a dense MLP's two Linears) takes the
    // stored tensor with twice its rows, the gate the even rows and up the odd ones. The stored tensor is the only
    // unpaired one of that shape in the same layer and location.
    private void PairInterleaved(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static string Key(ModuleTree tree, ParameterNode p, long[] shape) =>
            $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).Location}|{string.Join(',', shape)}";
        var candidates = unpairedOther.Select(n => otherByName[n]).Where(p => p.Shape.Length >= 2)
            .GroupBy(p => Key(other, p, p.Shape)).ToDictionary(g => g.Key, g => g.ToList());
        var claimed = new List<string>();
        foreach (ParameterNode p in unpairedRuntime.ToList())
        {
            if (p.Shape.Length < 2) continue;
            // A dense MLP's projections are Linears (their tensor is "weight"); expert projections are the tensors themselves.
            var projection = p.LocalName == "weight" ? runtime.OwnerOf(p).Name[(runtime.OwnerOf(p).Name.LastIndexOf('.') + 1)..] : p.LocalName;
            var rows = (long[])p.Shape.Clone();
            InterleavedRows half;
            switch (projection)
            {
                case "gate_up_proj": half = InterleavedRows.EvenThenOdd; break;
                case "gate_proj": half = InterleavedRows.Even; rows[^2] *= 2; break;
                case "up_proj": half = InterleavedRows.Odd; rows[^2] *= 2; break;
                default: continue;
            }
            if (!candidates.TryGetValue(Key(runtime, p, rows), out var match) || match.Count != 1) continue;
            _alternatives[p.Name] = new Alternative([match[0]], IsSliceOfFused: false, Interleaved: half);
            unpairedRuntime.Remove(p);
            claimed.Add(match[0].Name);
        }
        foreach (var name in claimed) unpairedOther.Remove(name);
    }

    // A runtime tensor stored as several tensors concatenated along dimension 0: siblings of its module whose attributes
    // end in "_" + its module's attribute (self_attn.conv1d ↔ self_attn.q_conv1d, k_conv1d, v_conv1d), or children of its
    // module named shard_{i} (Qwen4-Exp's ple_embedding.ngram_embedding.weight ↔ ngram_embedding.shard_{i}.weight), with
    // the same tensor name and trailing dims, whose rows add up to its rows; concatenated in the other tree's
    // registration order.
    private void PairConcatenated(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static (string Parent, string Attribute) Split(string module)
        {
            int dot = module.LastIndexOf('.');
            return dot < 0 ? ("", module) : (module[..dot], module[(dot + 1)..]);
        }
        var order = RegistrationOrder(other);
        foreach (ParameterNode whole in unpairedRuntime.ToList())
        {
            if (whole.Shape.Length == 0) continue;
            var owner = runtime.OwnerOf(whole).Name;
            var (parent, attribute) = Split(owner);
            var parts = unpairedOther.Select(n => otherByName[n])
                .Where(p => p.LocalName == whole.LocalName && p.Shape.Length == whole.Shape.Length && p.Shape.Skip(1).SequenceEqual(whole.Shape.Skip(1)))
                .Where(p => Split(other.OwnerOf(p).Name) is var (pp, pa)
                            && ((pp == parent && pa.EndsWith("_" + attribute, StringComparison.Ordinal)) || (pp == owner && IsShard(pa))))
                .OrderBy(p => order[p.Name]).ToList();
            if (parts.Count < 2 || parts.Sum(p => p.Shape[0]) != whole.Shape[0]) continue;
            _alternatives[whole.Name] = new Alternative(parts, IsSliceOfFused: false, Concatenated: true);
            unpairedRuntime.Remove(whole);
            foreach (ParameterNode part in parts) unpairedOther.Remove(part.Name);
        }
    }

    private static bool IsShard(string attribute) =>
        attribute.StartsWith("shard_", StringComparison.Ordinal) && attribute.Length > 6 && attribute[6..].All(char.IsAsciiDigit);

    // A fused gate_up_proj [E, 2I, H] stored as two already stacked 3-D weights of the same layer, gate_proj [E, I, H] then
    // up_proj [E, I, H], concatenated along dimension 1 (Step-3.7's moe.gate_proj.weight / moe.up_proj.weight).
    private void PairStackedGateUp(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static string Attribute(ModuleNode m) => m.Name[(m.Name.LastIndexOf('.') + 1)..];
        foreach (ParameterNode fused in unpairedRuntime.ToList())
        {
            ModuleNode owner = runtime.OwnerOf(fused);
            if (owner.Kind != ModuleKind.Experts || owner.IsTransposed || fused.LocalName != "gate_up_proj" || fused.Shape.Length != 3) continue;
            ParameterNode? Stacked(Role role) => unpairedOther.Select(n => otherByName[n]).SingleOrDefault(p => other.OwnerOf(p) is { Kind: ModuleKind.Experts } o && o.LayerIndex == owner.LayerIndex && p.Shape.Length == 3
                    && RoleOf(Attribute(o), out var r) && r == role && p.Shape[0] == fused.Shape[0] && p.Shape[2] == fused.Shape[2]);
            if (Stacked(Role.Gate) is not { } gate || Stacked(Role.Up) is not { } up || gate.Shape[1] + up.Shape[1] != fused.Shape[1]) continue;
            _alternatives[fused.Name] = new Alternative([gate, up], IsSliceOfFused: false, Concatenated: true, ConcatDim: 1);
            unpairedRuntime.Remove(fused);
            unpairedOther.Remove(gate.Name);
            unpairedOther.Remove(up.Name);
        }
    }

    // q_proj, k_proj and v_proj tensors stored as one torch nn.MultiheadAttention-style in_proj_<tensor>, their rows in that
    // order (transformers' Chunk(dim=0)); q and k rows take the rope permutation when the family declares one. Attention
    // modules outside the decoder layers (a vision tower's, no layer index) pair with the in_proj tensors of their layer
    // index in registration order, as many on each side.
    private void PairInProjChunks(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName, long ropeHeads)
    {
        static (string Parent, string Attribute) Split(string module)
        {
            int dot = module.LastIndexOf('.');
            return dot < 0 ? ("", module) : (module[..dot], module[(dot + 1)..]);
        }
        string[] roles = ["q_proj", "k_proj", "v_proj"];
        var triples = unpairedRuntime.Where(p => roles.Contains(Split(runtime.OwnerOf(p).Name).Attribute))
            .GroupBy(p => (Split(runtime.OwnerOf(p).Name).Parent, p.LocalName))
            .Select(g => roles.Select(r => g.SingleOrDefault(p => Split(runtime.OwnerOf(p).Name).Attribute == r)).ToList())
            .Where(t => t.All(p => p is not null)).Select(t => t.Select(p => p!).ToList()).ToList();
        var order = RegistrationOrder(other);
        foreach (var group in triples.GroupBy(t => (runtime.OwnerOf(t[0]).LayerIndex, t[0].LocalName)))
        {
            var mine = group.ToList();
            var fused = unpairedOther.Select(n => otherByName[n])
                .Where(p => p.LocalName == "in_proj_" + group.Key.LocalName && other.OwnerOf(p).LayerIndex == group.Key.LayerIndex)
                .OrderBy(p => order[p.Name]).ToList();
            if (fused.Count != mine.Count) continue;
            for (int i = 0; i < mine.Count; i++)
            {
                var parts = mine[i];
                if (fused[i].Shape[0] != parts.Sum(p => p.Shape[0]) || !fused[i].Shape.Skip(1).SequenceEqual(parts[0].Shape.Skip(1))) continue;
                long offset = 0;
                foreach (var part in parts)
                {
                    _alternatives[part.Name] = new Alternative([fused[i]], IsSliceOfFused: false,
                        Chunk: new RopeChunk(offset, Split(runtime.OwnerOf(part).Name).Attribute == "v_proj" ? 0 : ropeHeads));
                    offset += part.Shape[0];
                    unpairedRuntime.Remove(part);
                }
                unpairedOther.Remove(fused[i].Name);
            }
        }
    }

    // A stored tensor split into equal row chunks on load (transformers' Chunk(dim=0)): a run of sibling runtime tensors
    // of one shape, registered one after another, with the stored tensor's name, layer and location, whose modules'
    // initials spell the end of the stored module's attribute (attn.q_proj, k_proj, v_proj ↔ wqkv), their rows adding
    // up to its rows. Each takes its rows of the stored tensor, in registration order. Only a unique match pairs.
    private void PairChunks(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static string Parent(string module) => module.Contains('.', StringComparison.Ordinal) ? module[..module.LastIndexOf('.')] : "";
        static string Attribute(string module) => module[(module.LastIndexOf('.') + 1)..];
        foreach (string name in unpairedOther.ToList())
        {
            ParameterNode whole = otherByName[name];
            ModuleNode wholeOwner = other.OwnerOf(whole);
            if (whole.Shape.Length == 0) continue;
            var runs = new List<List<ParameterNode>>();
            var candidates = unpairedRuntime.Where(p => p.LocalName == whole.LocalName && p.Shape.Length == whole.Shape.Length
                    && p.Shape.Skip(1).SequenceEqual(whole.Shape.Skip(1))
                    && runtime.OwnerOf(p) is var o && o.LayerIndex == wholeOwner.LayerIndex && o.Location == wholeOwner.Location)
                .GroupBy(p => Parent(runtime.OwnerOf(p).Name));
            foreach (var siblings in candidates.Select(g => g.ToList()))
                for (int first = 0; first < siblings.Count; first++)
                    for (int count = 2; first + count <= siblings.Count; count++)
                    {
                        var run = siblings.GetRange(first, count);
                        var initials = string.Concat(run.Select(p => Attribute(runtime.OwnerOf(p).Name)[0]));
                        if (run.All(p => p.Shape[0] == run[0].Shape[0]) && run[0].Shape[0] * count == whole.Shape[0]
                            && Attribute(wholeOwner.Name).EndsWith(initials, StringComparison.Ordinal))
                            runs.Add(run);
                    }
            if (runs.Count != 1) continue;
            long offset = 0;
            foreach (ParameterNode part in runs[0])
            {
                _alternatives[part.Name] = new Alternative([whole], IsSliceOfFused: false, Chunk: new RopeChunk(offset, 0));
                offset += part.Shape[0];
                unpairedRuntime.Remove(part);
            }
            unpairedOther.Remove(name);
        }
    }

    // One stored tensor split by rows among modules of its own class in the same layer (transformers' Chunk(dim=0) with
    // several targets: ERNIE 4.5 VL's mlp.moe_statics.e_score_correction_bias [2, E], row 0 the text router's statics
    // [1, E], row 1 the vision router's): as many tensors of its name, layer, owner class and trailing dims as there are
    // on the other side, their rows adding up to its rows, taken in registration order. Either side may hold the whole:
    // each runtime piece takes its rows of a stored whole (a chunk), a runtime whole the stored pieces concatenated.
    private void PairRowSplits(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static string Key(ModuleTree tree, ParameterNode p) =>
            $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).ClassName}|{p.LocalName}|{string.Join(',', p.Shape.Skip(1))}|{p.Shape.Length}";
        var runtimeOrder = RegistrationOrder(runtime);
        var otherOrder = RegistrationOrder(other);
        var mine = unpairedRuntime.Where(p => p.Shape.Length > 0).GroupBy(p => Key(runtime, p))
            .ToDictionary(g => g.Key, g => g.OrderBy(p => runtimeOrder[p.Name]).ToList());
        var theirs = unpairedOther.Select(n => otherByName[n]).Where(p => p.Shape.Length > 0).GroupBy(p => Key(other, p))
            .ToDictionary(g => g.Key, g => g.OrderBy(p => otherOrder[p.Name]).ToList());
        foreach (var (key, pieces) in mine)
        {
            if (!theirs.TryGetValue(key, out var match)) continue;
            if (pieces.Count >= 2 && match is [var whole] && pieces.Sum(p => p.Shape[0]) == whole.Shape[0])
            {
                long offset = 0;
                foreach (ParameterNode piece in pieces)
                {
                    _alternatives[piece.Name] = new Alternative([whole], IsSliceOfFused: false, Chunk: new RopeChunk(offset, 0));
                    offset += piece.Shape[0];
                    unpairedRuntime.Remove(piece);
                }
                unpairedOther.Remove(whole.Name);
            }
            else if (pieces is [var mineWhole] && match.Count >= 2 && match.Sum(p => p.Shape[0]) == mineWhole.Shape[0])
            {
                _alternatives[mineWhole.Name] = new Alternative(match, IsSliceOfFused: false, Concatenated: true);
                unpairedRuntime.Remove(mineWhole);
                foreach (ParameterNode part in match) unpairedOther.Remove(part.Name);
            }
        }
    }

    // Router weights stored transposed (ModelSpec.CheckpointRoutersTransposed): each unpaired 2-D tensor of a router
    // module takes the unpaired 2-D tensor of the other tree's router of the same layer and class whose shape is its
    // transpose, in registration order, as many on each side (ERNIE 4.5 VL: text_moe.gate.weight and vision_moe.gate.weight
    // [E, H] at run time, gate.weight and gate.weight_1 [H, E] on disk).
    private void PairTransposedRouters(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        static string Key(ModuleTree tree, ParameterNode p, bool transpose) =>
            $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).ClassName}|{string.Join(',', transpose ? p.Shape.Reverse() : p.Shape)}";
        var paired = PairInOrder(unpairedRuntime, unpairedOther, otherByName, runtime, other, (tree, p) => Key(tree, p, transpose: false),
            otherKey: (tree, p) => Key(tree, p, transpose: true),
            only: (tree, p) => p.Shape.Length == 2 && tree.OwnerOf(p).Kind == ModuleKind.Router, transposed: true);
        foreach (var (mine, theirs) in paired)
        {
            unpairedRuntime.Remove(mine);
            unpairedOther.Remove(theirs.Name);
        }
    }

    // What is left was renamed between layouts (e.g. a MoE block or router attribute): pair parameters that are the
    // only ones of their kind in their layer, judged by location, attribute name and shape.
    private void PairByStructure(ModuleTree runtime, ModuleTree other, List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName)
    {
        string Key(ModuleTree tree, ParameterNode p) =>
            $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).Location}|{p.LocalName}|{string.Join(',', p.Shape)}";
        // First the full key, then, for what is still unpaired, looser keys in turn, each pairing only tensors still unique under it
        // (persistent buffers take part: AllParameters holds them, e.g. MiniMax-M2's block_sparse_moe.e_score_correction_bias
        // on disk, mlp.e_score_correction_bias at run time, pairs under the first key):
        // - the owner's own attribute too (a renamed parent: HY V3's shared_mlp.gate_proj / shared_experts.gate_proj, a
        //   renamed shared expert's gate_proj / up_proj of equal shapes);
        // - no location (a tensor moved to another module: EXAONE-MoE's correction bias, on the router at run time and on
        //   the MoE block on disk; Laguna's e_score_correction_bias under experts on disk, on the router at run time);
        // - fused expert tensors renamed as a whole, the only 3-D experts tensor of its shape in its layer (GraniteMoE's
        //   ParallelExperts input_linear.weight / output_linear.weight on disk, experts.gate_up_proj / down_proj at run time);
        // - no tensor name (a renamed tensor: HY V3's expert_bias / e_score_correction_bias);
        // - last, no tensor name but the layer's child that holds it (A.X-K2's gated norms: input_layernorm.W_down on
        //   disk, input_layernorm.mlp.fc1 at run time, with post_attention_layernorm's of the same shapes beside).
        static string Attribute(ModuleNode m) => m.Name[(m.Name.LastIndexOf('.') + 1)..];
        static bool IsExperts(ModuleTree tree, ParameterNode p) => tree.OwnerOf(p) is { Kind: ModuleKind.Experts } && p.Shape.Length == 3;
        Pair(Key);
        Pair((tree, p) => $"{Key(tree, p)}|{Attribute(tree.OwnerOf(p))}");
        Pair((tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{p.LocalName}|{string.Join(',', p.Shape)}");
        Pair((tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{string.Join(',', p.Shape)}", IsExperts);
        Pair((tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).Location}|{string.Join(',', p.Shape)}");
        Pair((tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{LayerChild(tree.OwnerOf(p))}|{tree.OwnerOf(p).Location}|{string.Join(',', p.Shape)}");
        // - very last, twins renamed together: as many tensors of one shape under modules of one class in a layer on both
        //   sides, paired in registration order (HY-V4's hyper-connections: attn_hc.fn / ffn_hc.fn at run time,
        //   hc_pre.hc_attn_layer.hc_fn / hc_pre.hc_mlp_layer.hc_fn on disk, all [2n, n·H]).
        PairInOrder(unpairedRuntime, unpairedOther, otherByName, runtime, other,
            (tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{tree.OwnerOf(p).ClassName}|{string.Join(',', p.Shape)}");
        // - and, after that, such twins whose owners differ too (DeepSeek-V4's hyper-connections: attn_hc.fn / ffn_hc.fn
        //   at run time, the layer's own hc_attn_fn / hc_ffn_fn on disk).
        PairInOrder(unpairedRuntime, unpairedOther, otherByName, runtime, other,
            (tree, p) => $"{tree.OwnerOf(p).LayerIndex}|{string.Join(',', p.Shape)}");

        void Pair(Func<ModuleTree, ParameterNode, string> key, Func<ModuleTree, ParameterNode, bool>? only = null)
        {
            var pairedOther = _alternatives.Values.SelectMany(a => a.Parts).Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
            var otherGroups = unpairedOther.Where(n => !pairedOther.Contains(n)).Select(n => otherByName[n])
                .Where(p => only is null || only(other, p))
                .GroupBy(p => key(other, p)).ToDictionary(g => g.Key, g => g.ToList());
            foreach (var group in unpairedRuntime.Where(p => !_alternatives.ContainsKey(p.Name) && (only is null || only(runtime, p)))
                .GroupBy(p => key(runtime, p)))
            {
                if (group.Count() != 1 || !otherGroups.TryGetValue(group.Key, out var match) || match.Count != 1) continue;
                _alternatives[group.Single().Name] = new Alternative([match[0]], IsSliceOfFused: false);
            }
        }
    }

    // Pairs each group of still-unpaired tensors sharing a key with the other tree's group of the same key and size, in
    // registration order; otherKey (default: key) keys the other tree's tensors, only filters both sides, and transposed
    // marks the pairs as stored transposed. Returns the pairs made.
    private List<(ParameterNode Mine, ParameterNode Theirs)> PairInOrder(List<ParameterNode> unpairedRuntime, HashSet<string> unpairedOther,
        Dictionary<string, ParameterNode> otherByName, ModuleTree runtime, ModuleTree other, Func<ModuleTree, ParameterNode, string> key,
        Func<ModuleTree, ParameterNode, string>? otherKey = null, Func<ModuleTree, ParameterNode, bool>? only = null, bool transposed = false)
    {
        var pairedOther = _alternatives.Values.SelectMany(a => a.Parts).Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
        var order = RegistrationOrder(other);
        var otherGroups = unpairedOther.Where(n => !pairedOther.Contains(n)).Select(n => otherByName[n])
            .Where(p => only is null || only(other, p))
            .GroupBy(p => (otherKey ?? key)(other, p)).ToDictionary(g => g.Key, g => g.OrderBy(p => order[p.Name]).ToList());
        var pairs = new List<(ParameterNode, ParameterNode)>();
        foreach (var group in unpairedRuntime.Where(p => !_alternatives.ContainsKey(p.Name) && (only is null || only(runtime, p)))
            .GroupBy(p => key(runtime, p)))
        {
            var mine = group.ToList();
            if (!otherGroups.TryGetValue(group.Key, out var match) || match.Count != mine.Count) continue;
            for (int i = 0; i < mine.Count; i++)
            {
                _alternatives[mine[i].Name] = new Alternative([match[i]], IsSliceOfFused: false, Transposed: transposed);
                pairs.Add((mine[i], match[i]));
            }
        }
        return pairs;
    }

    // Each parameter's position in its tree's registration order (named_parameters()), for pairing in that order.
    private static Dictionary<string, int> RegistrationOrder(ModuleTree tree) =>
        AllParameters(tree).Select((p, i) => (p.Name, i)).ToDictionary(e => e.Name, e => e.i, StringComparer.Ordinal);

    // The decoder layer's child a module sits in ("input_layernorm" for model.layers.3.input_layernorm.mlp.fc1): the
    // name segment after the first ".{layer}." (layers come before any expert index in a name); "" outside the layers.
    private static string LayerChild(ModuleNode m)
    {
        if (m.LayerIndex is not { } layer) return "";
        var marker = "." + layer.ToString(System.Globalization.CultureInfo.InvariantCulture) + ".";
        int at = m.Name.IndexOf(marker, StringComparison.Ordinal);
        if (at < 0) return "";
        var rest = m.Name[(at + marker.Length)..];
        int dot = rest.IndexOf('.');
        return dot < 0 ? rest : rest[..dot];
    }

    private sealed record ExpertWeight(ParameterNode Parameter, int? Layer, int Expert, Role Role);

    private static IEnumerable<ExpertWeight> PerExpertWeights(ModuleTree tree, IReadOnlySet<string> names)
    {
        foreach (ParameterNode p in AllParameters(tree))
        {
            if (!names.Contains(p.Name) || p.LocalName != "weight") continue;
            Match m = PerExpertModule().Match(tree.OwnerOf(p).Name);
            if (!m.Success || !RoleOf(m.Groups[2].Value, out Role role)) continue;
            yield return new ExpertWeight(p, tree.OwnerOf(p).LayerIndex, int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), role);
        }
    }

    // The projection names transformers' conversion mapping merges (Mixtral's w1/w3/w2 and the gate/up/down_proj family).
    private static bool RoleOf(string projection, out Role role)
    {
        (bool ok, role) = projection switch
        {
            "w1" or "gate_proj" => (true, Role.Gate),
            "w3" or "up_proj" => (true, Role.Up),
            "w2" or "down_proj" => (true, Role.Down),
            _ => (false, Role.Gate),
        };
        return ok;
    }

    // Persistent buffers are checkpoint tensors too (a correction bias may be renamed or moved like a parameter).
    private static IEnumerable<ParameterNode> AllParameters(ModuleTree tree) => tree.Modules.SelectMany(m => m.Parameters.Concat(m.Buffers));

    [GeneratedRegex(@"\.experts\.(\d+)\.([A-Za-z0-9_]+)$")]
    private static partial Regex PerExpertModule();
}
