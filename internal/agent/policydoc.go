package agent

// takePolicyDoc applies a cluster policy document from the registry.
func (a *Agent) takePolicyDoc(data []byte, source string) {
	a.log.Warn("cluster policy documents are not read yet", "source", source)
}
