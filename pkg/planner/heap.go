package planner

import "container/heap"

// nodeHeap orders nodes by their best option for one profile, ties to the
// lower node index, so that the top is what a scan in node order finds.
type nodeHeap []heapEntry

type heapEntry struct {
	o       option // gpu and start zeroed, busy set
	node    int
	version uint32
}

func (h nodeHeap) Len() int { return len(h) }
func (h nodeHeap) Less(i, j int) bool {
	if h[i].o.better(h[j].o) {
		return true
	}
	return !h[j].o.better(h[i].o) && h[i].node < h[j].node
}
func (h nodeHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *nodeHeap) Push(x any)   { *h = append(*h, x.(heapEntry)) }
func (h *nodeHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// entry is node ni's current best option for profile id as a heap entry.
func (w *world) entry(id, ni int) (heapEntry, bool) {
	o := w.nodes[ni].bestOn(id)
	o.gpu, o.start, o.busy = 0, 0, w.nodes[ni].busy
	return heapEntry{o: o, node: ni, version: w.version[ni]}, o.ok
}

// bestAnywhere returns the node with the best option for profile id over
// all nodes, or -1.
func (w *world) bestAnywhere(id int) int {
	h := w.heaps[id]
	if h == nil {
		h = &nodeHeap{}
		for ni := range w.nodes {
			if e, ok := w.entry(id, ni); ok {
				*h = append(*h, e)
			}
		}
		heap.Init(h)
		w.heaps[id] = h
	}
	for h.Len() > 0 {
		top := (*h)[0]
		if top.version == w.version[top.node] {
			return top.node
		}
		heap.Pop(h)
	}
	return -1
}

// touch records that node ni changed: its entries in the heaps go stale and
// fresh ones replace them.
func (w *world) touch(ni int) {
	w.version[ni]++
	for id, h := range w.heaps {
		if h == nil {
			continue
		}
		if e, ok := w.entry(id, ni); ok {
			heap.Push(h, e)
		}
	}
}
